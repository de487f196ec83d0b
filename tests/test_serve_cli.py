"""`mars serve` as a process, and `mars update --push` into a running server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest

import helpers_train as H

pytestmark = pytest.mark.network


def test_serve_prints_its_url_answers_and_exits_cleanly_on_sigterm(tiny_policy_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MARS_SERVE_API_KEY", None)
    p = subprocess.Popen([sys.executable, "-m", "mars_cli", "serve", "--policy", str(tiny_policy_dir), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = p.stdout.readline()  # printed once the policy is loaded
        ready = json.loads(line)
        assert ready["url"].startswith("http://127.0.0.1:") and ready["weight_version"] == 1
        h = httpx.get(ready["url"] + "/health")
        assert h.status_code == 200 and h.json()["fingerprint"] == ready["fingerprint"]
        # --allow-load defaults to the policy's parent directory: a sibling loads, elsewhere does not
        r = httpx.post(ready["url"] + "/load", json={"path": str(tmp_path)})
        assert r.status_code == 403 and str(tiny_policy_dir.parent) in r.json()["error"]["message"]
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err.decode()
    assert out == b""
    assert b"shutting down" in err and b"Traceback" not in err


def test_serve_refuses_a_public_address_without_a_key_and_bad_policies(tiny_policy_dir, tmp_path):
    from clirun import Ran

    r = Ran(["serve", "--policy", tiny_policy_dir, "--host", "0.0.0.0"], env={"MARS_SERVE_API_KEY": ""})
    assert r.exit_code == 2 and "MARS_SERVE_API_KEY" in r.stderr
    r = Ran(["serve", "--policy", tiny_policy_dir, "--sleep-mode", "maybe"])
    assert r.exit_code == 2 and "--sleep-mode must be auto, on or off" in r.stderr
    r = Ran(["serve", "--policy", tmp_path / "nope"])
    assert r.exit_code == 1 and "mars serve: " in r.stderr and "no such model directory" in r.stderr
    broken = tmp_path / "broken"
    shutil.copytree(tiny_policy_dir, broken)
    (broken / "model.safetensors").write_bytes(b"junk")
    r = Ran(["serve", "--policy", broken, "--port", "0"])
    assert r.exit_code == 1 and "mars serve: " in r.stderr and r.stdout == ""
    try:
        import vllm  # noqa: F401
    except ImportError:
        r = Ran(["serve", "--policy", tiny_policy_dir, "--engine", "vllm", "--port", "0"])
        assert r.exit_code == 1 and "needs vLLM" in r.stderr


def test_update_push_loads_the_new_checkpoint_and_a_failed_push_exits_1(tiny_policy_dir, tmp_path):
    from mars_cli.models.load import fingerprint
    from mars_cli.serve.app import App
    from mars_cli.serve.hf_backend import HFBackend
    from mars_cli.serve.run import in_thread

    ck = tmp_path / "ck"
    shutil.copytree(tiny_policy_dir, ck)
    batch = H.write_batch(ck, tmp_path / "b.jsonl", [1.0, -1.0], image_dir=tmp_path)
    recs = [json.loads(x) for x in batch.read_text().splitlines()]
    for rec in recs:  # sampled by ck, at the server's weight version 1
        rec["policy"] = {**(rec.get("policy") or {}), "fingerprint": fingerprint(ck), "weight_version": 1}
    batch.write_text("".join(json.dumps(rec) + "\n" for rec in recs))
    app = App(HFBackend(), allow_load=str(tmp_path), max_images=4, max_image_bytes=1 << 20)
    with in_thread(app, str(ck)) as url:
        r = H.Ran(["update", batch, "--policy", ck, "--out", tmp_path / "ck2", "--lr", "1e-3", "--push", url])
        assert r.exit_code == 0, r.stderr
        m = json.loads(r.stdout)
        fp2 = fingerprint(tmp_path / "ck2")
        (res,) = m["push"]
        assert {k: res[k] for k in ("url", "fingerprint", "weight_version")} == {"url": url, "fingerprint": fp2,
                                                                                 "weight_version": 2}
        assert res["probe"]["gap"] <= res["probe"]["bound"] == 2e-2 and res["probe"]["tokens"] > 0  # proven
        assert set(m["logprob_gap"]) >= {"max", "mean_abs"}
        assert m["sampled_by"] == {"fingerprints": {fingerprint(ck): 2}, "weight_versions": {"1": 2}, "other_policy": 0}
        h = httpx.get(url + "/health").json()
        assert (h["fingerprint"], h["weight_version"], h["policy"]) == (fp2, 2, str(tmp_path / "ck2"))
        # The batch sampled by ck is trained on by ck2 (stale by one step): reported, not refused.
        r = H.Ran(["update", batch, "--policy", tmp_path / "ck2", "--out", tmp_path / "ck3", "--lr", "1e-3",
                   "--push", f"{url},http://127.0.0.1:9"])
        assert r.exit_code == 1
        assert "http://127.0.0.1:9" in r.stderr and "not loaded by 1 of 2 server(s)" in r.stderr
        assert (tmp_path / "ck3" / "config.json").exists()  # the checkpoint stays written
        m = json.loads(r.stdout)
        assert m["sampled_by"]["other_policy"] == 2 and "error" in m["push"]
        assert httpx.get(url + "/health").json()["weight_version"] == 3  # the live server did load it


@pytest.mark.slow  # ~60 s on 2 cores: two rollouts, a check and an update through one server
def test_rollout_against_serve_checks_then_a_push_changes_the_fingerprint_without_restart(tiny_policy_dir, tmp_path):
    from mars_cli.models.load import fingerprint
    from mars_cli.serve.app import App
    from mars_cli.serve.hf_backend import HFBackend
    from mars_cli.serve.run import in_thread

    ck = tmp_path / "ck"
    shutil.copytree(tiny_policy_dir, ck)
    assert H.Ran(["data", "synth", "-o", tmp_path / "synth", "-n", "2", "--seed", "0"]).exit_code == 0
    assert H.Ran(["index", "text", tmp_path / "synth" / "corpus.jsonl", "--out", tmp_path / "idx"]).exit_code == 0
    app = App(HFBackend(), allow_load=str(tmp_path), max_images=8, max_image_bytes=32 << 20)
    roll = ["--max-turns", "2", "--max-new-tokens", "12", "--index", tmp_path / "idx", tmp_path / "synth" / "tasks.jsonl"]
    with in_thread(app, str(ck)) as url:
        r = H.Ran(["rollout", "--server", url, "-n", "2", "-o", tmp_path / "t1.jsonl", *roll])
        assert r.exit_code == 0, r.stderr
        recs = [json.loads(x) for x in (tmp_path / "t1.jsonl").read_text().splitlines()]
        assert len(recs) == 4 and {(x["policy"]["fingerprint"], x["policy"]["weight_version"]) for x in recs} == {(fingerprint(ck), 1)}
        r = H.Ran(["rollout", "--check", "--policy", ck, tmp_path / "t1.jsonl"])
        assert r.exit_code == 0, r.stderr
        assert all(json.loads(x)["check"]["ok"] for x in r.stdout.splitlines())
        r = H.Ran(["judge", "-o", tmp_path / "j.jsonl", tmp_path / "t1.jsonl"])
        assert r.exit_code == 0, r.stderr
        assert H.Ran(["advantage", "-o", tmp_path / "b.jsonl", tmp_path / "j.jsonl"]).exit_code == 0
        r = H.Ran(["update", tmp_path / "b.jsonl", "--policy", ck, "--out", tmp_path / "ck2", "--lr", "1e-3", "--push", url])
        assert r.exit_code == 0, r.stderr
        m = json.loads(r.stdout)
        assert m["logprob_gap"]["max"] < 1e-4  # the server sampled exactly what the trainer computes
        r = H.Ran(["rollout", "--server", url, "-n", "1", "-o", tmp_path / "t2.jsonl", *roll])
        assert r.exit_code == 0, r.stderr
        recs = [json.loads(x) for x in (tmp_path / "t2.jsonl").read_text().splitlines()]
        fp2 = fingerprint(tmp_path / "ck2")
        assert {(x["policy"]["fingerprint"], x["policy"]["weight_version"]) for x in recs} == {(fp2, 2)}
