"""The push probe: /load reports it, and a push fails when a server serves other weights than it reports.

The wrong server is a real `mars serve --engine hf` whose load keeps the old model's (tied)
embeddings, the way an in-place reload that mishandles tied embeddings would: it reports
the new fingerprint and weight version, and only the probe can tell.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import httpx
import pytest

import helpers_train as H
from test_update_follow import COMMON, advantage, judged_file

pytestmark = pytest.mark.network
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_policy_dir):
    """root/ck (the tiny model, seed 0) and root/other (seed 1): the servers load from root."""
    from mars_cli.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("probe")
    ck = root / "ck"
    shutil.copytree(tiny_policy_dir, ck)
    return root, ck, make_tiny_model(root / "other", arch="qwen2.5-vl", seed=1)


def hf_server(root, policy):
    from mars_cli.serve.app import App
    from mars_cli.serve.hf_backend import HFBackend
    from mars_cli.serve.run import in_thread

    return in_thread(App(HFBackend(seed=0), allow_load=str(root), max_images=4, max_image_bytes=1 << 20), str(policy))


def keep_old_embeddings(monkeypatch):
    """Make every load of the hf backend keep the embeddings (tied to the output head) it
    served before: the fault scripts/push_probe_gap.py measures the bound against."""
    from mars_cli.serve.hf_backend import HFBackend

    spec = importlib.util.spec_from_file_location("push_probe_gap", ROOT / "scripts" / "push_probe_gap.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(HFBackend, "_load", script.stale_embeddings(HFBackend._load))


def test_load_reports_the_probe_which_matches_the_new_weights_and_is_10x_off_the_old(models):
    from mars_cli.models.load import load_policy, load_tokenizer, special_ids
    from mars_cli.serve import probe as P
    from mars_cli.serve.push import push_checkpoint

    root, ck, other = models
    with hf_server(root, other) as url:
        r = httpx.post(url + "/load", json={"path": str(ck)}, timeout=300)
        assert r.status_code == 200, r.text
        probe = r.json()["probe"]
        assert probe["prompt_ids"] == P.prompt_ids(special_ids(load_tokenizer(ck))) and len(probe["prompt_ids"]) == 16
        assert 1 <= len(probe["token_ids"]) == len(probe["logprobs"]) <= P.NEW_TOKENS and probe["weight_version"] == 2
        new = P.gaps(probe, P.reference_logprobs(load_policy(ck), [probe])[0])
        old = P.gaps(probe, P.reference_logprobs(load_policy(other), [probe])[0])
        assert new["gap"] <= P.MAX_GAP and old["gap"] > 10 * P.MAX_GAP, (new, old)
        # push_checkpoint's default reference: the checkpoint as written, on the CPU
        (res,) = push_checkpoint([url], str(other))
        assert res["weight_version"] == 3 and res["probe"]["gap"] <= res["probe"]["bound"] == P.MAX_GAP
        assert 1 <= res["probe"]["tokens"] <= P.NEW_TOKENS
        # A paused server loads but is not probed (its generate is held): the push cannot be proven.
        assert httpx.post(url + "/pause", params={"mode": "abort"}).status_code == 200
        r = httpx.post(url + "/load", json={"path": str(ck)}, timeout=300)
        assert r.status_code == 200 and r.json()["probe"] == {"error": "not probed: the server is paused"}
        assert P.check_answer(r.json()["probe"]) == "its probe failed: not probed: the server is paused"
        httpx.post(url + "/resume")


def test_probe_prompt_answer_checks_and_gaps(tmp_path):
    import math

    from mars_cli.models.load import load_tokenizer, special_ids
    from mars_cli.models.tiny import make_tiny_model
    from mars_cli.serve import probe as P

    small = make_tiny_model(tmp_path / "small", arch="qwen2.5-vl", seed=0, vocab=1000)
    special = special_ids(load_tokenizer(small))
    ids = P.prompt_ids(special)  # <|im_start|>, then text ids spread evenly below the first special id
    assert ids[0] == special["im_start"] and min(special.values()) == 1000
    assert ids[1:] == [int((k + 0.5) * 1000 / 15) for k in range(15)] and len(set(ids)) == P.PROMPT_TOKENS
    body = P.request(special)
    sp = body["sampling_params"]
    assert body["token_ids"] == ids and (sp["temperature"], sp["top_p"], sp["top_k"]) == (1.0, 1.0, -1)
    assert sp["max_tokens"] == P.NEW_TOKENS and sp["logprobs"] == 0 and sp["stop_token_ids"] == [special["im_end"]]
    good = {"prompt_ids": ids, "token_ids": [5, 6], "logprobs": [-1.0, -2.0], "weight_version": 2}
    assert P.check_answer(good, 1100) is None  # the embedding rows: text ids and the special ones
    assert "no probe" in P.check_answer(None)  # a server without the probe: not proven
    assert "outside the vocabulary" in P.check_answer({**good, "token_ids": [5, 1100]}, 1100)
    assert "malformed" in P.check_answer({**good, "logprobs": [-1.0]})
    assert P.gaps(good, [-1.5, -2.0]) == {"gap": 0.5, "mean": 0.25, "tokens": 2}
    assert P.gaps({**good, "logprobs": [math.nan, -2.0]}, [-1.0, -2.0])["gap"] == math.inf  # NaN never passes


def test_a_server_keeping_old_embeddings_fails_the_push_unless_the_bound_allows_it(models, monkeypatch):
    from mars_cli.models.load import fingerprint
    from mars_cli.serve.push import ProbeError, push_checkpoint

    root, ck, other = models
    keep_old_embeddings(monkeypatch)
    with hf_server(root, other) as url:
        with pytest.raises(ProbeError) as e:
            push_checkpoint([url], str(ck))
        msg = str(e.value)
        assert f"{url}: serves other weights than it reports" in msg and "over the bound 0.02" in msg, msg
        (srv,) = e.value.results
        assert srv["probe"]["gap"] > 10 * srv["probe"]["bound"]
        h = httpx.get(url + "/health").json()  # what the server claims: exactly what the push asked for
        assert (h["fingerprint"], h["weight_version"]) == (fingerprint(ck), 2)
        monkeypatch.setenv("MARS_PUSH_MAX_GAP", "100")  # a bound that allows it: the push passes, gap reported
        (res,) = push_checkpoint([url], str(ck))  # (the embeddings kept are still other's)
        assert res["probe"]["bound"] == 100 and res["probe"]["gap"] > 0.2


@pytest.mark.slow  # ~60 s on 2 cores: two one-step updates
def test_update_push_passes_on_a_correct_load_and_exits_1_on_wrong_weights_with_the_checkpoint_written(
        models, tmp_path, monkeypatch):
    root, ck, other = models
    batch = H.write_batch(ck, tmp_path / "b.jsonl", [1.0, -1.0])
    with hf_server(root, other) as url:
        r = H.Ran(["update", batch, "--policy", ck, "--out", root / "good", "--lr", "1e-3", "--push", url])
        assert r.exit_code == 0, r.stderr
        (res,) = json.loads(r.stdout)["push"]
        assert res["probe"]["gap"] <= res["probe"]["bound"] == 2e-2
    keep_old_embeddings(monkeypatch)
    with hf_server(root, other) as url:
        r = H.Ran(["update", batch, "--policy", ck, "--out", root / "bad", "--lr", "1e-3", "--push", url])
    assert r.exit_code == 1
    assert "not served as written by 1 of 1 server(s)" in r.stderr and f"{url}: serves other weights" in r.stderr
    assert "over the bound 0.02 (--push-max-gap)" in r.stderr and f"the checkpoint stays at {root / 'bad'}" in r.stderr
    assert (root / "bad" / "config.json").exists()  # the checkpoint stays written
    m = json.loads(r.stdout)  # and its record is printed, the gap in it
    (srv,) = m["push"]["servers"]
    assert srv["url"] == url and srv["probe"]["gap"] > 10 * srv["probe"]["bound"] and "error" in m["push"]


@pytest.mark.slow  # ~90 s on 2 cores: three resident-trainer steps
def test_follow_push_proves_every_step_and_stops_on_a_server_serving_other_weights(models, tmp_path, monkeypatch):
    root, ck, other = models
    b1 = advantage(judged_file(ck, tmp_path / "j1.jsonl", "a", 2), tmp_path / "b1.jsonl")
    b2 = advantage(judged_file(ck, tmp_path / "j2.jsonl", "b", 2), tmp_path / "b2.jsonl")
    with hf_server(root, other) as url:
        r = H.Ran(["update", "--follow", b1, b2, "--policy", ck, "--out", root / "follow-good", "--push", url, *COMMON])
        assert r.exit_code == 0, r.stderr
    ms = [json.loads(x) for x in r.stdout.splitlines()]
    assert [m["push"]["ok"] for m in ms] == [True, True] and [m["push"]["weight_version"] for m in ms] == [2, 3]
    assert all(m["push"]["probe"]["gap"] <= m["push"]["probe"]["bound"] == 2e-2 for m in ms)

    keep_old_embeddings(monkeypatch)
    out = root / "follow-bad"
    with hf_server(root, other) as url:
        r = H.Ran(["update", "--follow", b1, b2, "--policy", ck, "--out", out, "--push", url, "--save-every", "2",
                   *COMMON])
    assert r.exit_code == 1
    assert f"{url}: serves other weights than it reports" in r.stderr and "stopping" in r.stderr
    (m,) = [json.loads(x) for x in r.stdout.splitlines()]  # step 1's record, then nothing more
    assert m["step"] == 1 and m["push"]["ok"] is False and m["push"]["probe"]["gap"] > 10 * m["push"]["probe"]["bound"]
    assert m["push"]["probe"]["servers"] == {url: m["push"]["probe"]["gap"]}
    # Step 1 was not due to be saved (--save-every 2): its weights went to OUT/.push, and the
    # stop saved it, optimizer included, so a restart resumes after it.
    assert (out / ".push" / "config.json").exists() and (out / "step-1" / "optimizer").is_dir()


def test_refused_pushes_stall_the_lease_and_three_in_a_row_stop_the_trainer(models, tmp_path):
    """A refused push leaves the servers on older weights: the trainer's lease says
    "stalled" (a rollout held back by --max-staleness then goes ahead, so a next step can
    push again), a push that works says "following" again, and 3 refused in a row stop it."""
    from mars_cli.serve.app import App
    from mars_cli.serve.hf_backend import HFBackend
    from mars_cli.serve.lease import Heartbeat
    from mars_cli.serve.run import in_thread

    root, ck, other = models
    elsewhere = tmp_path / "elsewhere"  # the servers load only from there: every push is refused
    elsewhere.mkdir()
    bs = [advantage(judged_file(ck, tmp_path / f"j{i}.jsonl", k, 2), tmp_path / f"b{i}.jsonl")
          for i, k in enumerate("abc")]
    app = App(HFBackend(seed=0), allow_load=str(elsewhere), max_images=4, max_image_bytes=1 << 20)
    with in_thread(app, str(other)) as url:
        def trainer():
            return httpx.get(url + "/health").json()["trainer"]

        hb = Heartbeat([url])
        assert trainer()["state"] == "following"
        hb.pushed(False)
        assert trainer()["state"] == "stalled"
        hb.pushed(True)
        assert trainer()["state"] == "following"
        hb.close()
        assert trainer()["state"] == "done"
        out = tmp_path / "out"
        r = H.Ran(["update", "--follow", *bs, "--policy", ck, "--out", out, "--push", url, *COMMON])
        assert r.exit_code == 1, r.stderr
        assert "3 pushes in a row failed" in r.stderr and "stopping" in r.stderr
        ms = [json.loads(x) for x in r.stdout.splitlines()]
        assert [m["step"] for m in ms] == [1, 2, 3] and not any(m["push"]["ok"] for m in ms)
        assert trainer()["state"] == "done" and httpx.get(url + "/health").json()["weight_version"] == 1
    assert (out / "step-3" / "optimizer").is_dir()  # the last step saved: a restart resumes after it
