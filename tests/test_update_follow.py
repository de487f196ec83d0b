"""`mars update --follow`: the resident trainer on the tiny model (CPU, one process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import helpers_train as H

MARS = [sys.executable, "-m", "mars_cli"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def judged_file(policy_dir, path: Path, prefix: str, n_groups: int, *, k: int = 2, policy: dict | None = None) -> Path:
    """k samples per group with rewards 0/1, as `mars judge` would leave them."""
    from mars_cli import protocol
    from mars_cli.jsonl import write_records
    from mars_cli.models.load import load_tokenizer, special_ids

    tok = load_tokenizer(policy_dir)
    r = protocol.Renderer(tok, special_ids(tok))
    recs = []
    for g in range(n_groups):
        for s in range(k):
            rec = H.trajectory(r, f"{prefix}{g}", f"What is in {prefix} {g}?", H.ANSWERS[(g + s) % 4], [])
            rec.update(group=f"{prefix}{g}", sample=s, reward=float((g + s) % 2))
            del rec["advantage"]
            if policy is not None:
                rec["policy"] = dict(policy)
            recs.append(rec)
    write_records(recs, path)
    return path


def advantage(judged: Path, out: Path) -> Path:
    p = subprocess.run([*MARS, "advantage", str(judged), "-o", str(out)], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    return out


def metrics(stdout: str) -> list[dict]:
    return [json.loads(x) for x in stdout.splitlines() if x.strip()]


def params(model_dir) -> dict:
    from mars_cli.models.load import load_policy

    return {n: p.detach().clone() for n, p in load_policy(model_dir).model.named_parameters()}


COMMON = ["--loss", "grpo", "--old-logprobs", "rollout", "--lr", "1e-3", "--beta", "0", "--micro-batch-tokens", "400"]


def test_two_batches_piped_take_two_steps_and_leave_one_loadable_checkpoint(tiny_policy_dir, tmp_path):
    """The issue's case, through a real pipe; the weights equal two plain updates chained with --state."""
    b1 = advantage(judged_file(tiny_policy_dir, tmp_path / "j1.jsonl", "a", 2), tmp_path / "b1.jsonl")
    b2 = advantage(judged_file(tiny_policy_dir, tmp_path / "j2.jsonl", "b", 2), tmp_path / "b2.jsonl")
    ck = tmp_path / "ck"
    p = subprocess.run(f"cat {b1} {b2} | {sys.executable} -m mars_cli update --follow --policy {tiny_policy_dir} "
                       f"--out {ck} --keep-last 1 {' '.join(COMMON)} --report-to tensorboard --logging-dir {tmp_path / 'tb'}",
                       shell=True, capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr
    ms = metrics(p.stdout)
    assert [m["step"] for m in ms] == [1, 2] and all(m["kind"] == "update" for m in ms)
    for m, batch in zip(ms, (b1, b2)):  # each step reports its own batch's mean judged rewards
        recs = [json.loads(x) for x in batch.read_text().splitlines()]
        assert m["rewards"]["reward"] == pytest.approx(sum(r["reward"] for r in recs) / len(recs))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "tb"))  # each step's record, live, in TensorBoard's own reader
    tb.Reload()
    assert [(e.step, e.value) for e in tb.Scalars("train/loss")] == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in ms]
    ids = [json.loads(open(b).readline())["batch"]["id"] for b in (b1, b2)]
    assert [m["batch"]["id"] for m in ms] == ids and ids[0] != ids[1]
    assert [m["out"] for m in ms] == [str(ck / "step-1"), str(ck / "step-2")]
    assert sorted(x.name for x in ck.iterdir()) == ["step-2"]  # --keep-last 1
    assert (ck / "step-2" / "optimizer" / "mars_state.json").is_file()
    assert not (ck / "step-2" / "optimizer" / "config.json").exists()
    meta = json.loads((ck / "step-2" / "mars_meta.json").read_text())
    assert meta["run_step"] == 2 and meta["parent"] == str(ck / "step-1")

    # The same two steps as the shell loop: update b1, then update b2 resuming the optimizer.
    st = tmp_path / "state"
    for src, batch, dst in ((tiny_policy_dir, b1, tmp_path / "s1"), (tmp_path / "s1", b2, tmp_path / "s2")):
        q = subprocess.run([*MARS, "update", str(batch), "--policy", str(src), "--out", str(dst), "--state", str(st), *COMMON],
                           capture_output=True, text=True, env=ENV, timeout=600)
        assert q.returncode == 0, q.stderr
    want, got, start = params(tmp_path / "s2"), params(ck / "step-2"), params(tiny_policy_dir)
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(got[name], start[name])
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=0, atol=1e-6), n
    assert ms[1]["loss"] == pytest.approx(metrics(q.stdout)[0]["loss"], abs=1e-6)


def test_killed_trainer_resumes_with_the_same_numbering_and_skips_trained_batches(tiny_policy_dir, tmp_path):
    b1 = advantage(judged_file(tiny_policy_dir, tmp_path / "j1.jsonl", "a", 2), tmp_path / "b1.jsonl")
    b2 = advantage(judged_file(tiny_policy_dir, tmp_path / "j2.jsonl", "b", 2), tmp_path / "b2.jsonl")
    ck = tmp_path / "ck"
    cmd = [*MARS, "update", "--follow", "--policy", str(tiny_policy_dir), "--out", str(ck), *COMMON]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        proc.stdin.write(b1.read_bytes() + b2.read_bytes()[: len(b2.read_bytes()) // 2])  # b2 arrives half
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())
        assert first["step"] == 1
        proc.kill()  # mid-stream, waiting for the rest of b2
        proc.wait(timeout=60)
    finally:
        proc.kill()
    from mars_cli.models.load import load_policy

    assert sorted(x.name for x in ck.iterdir()) == ["step-1"]
    assert load_policy(ck / "step-1").fingerprint == first["fingerprint"]
    # Restarted, the same command on the whole stream: b1 is recognised and skipped, b2 is step 2.
    p = subprocess.run(cmd, input=b1.read_bytes() + b2.read_bytes(), capture_output=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    ms = metrics(p.stdout.decode())
    # The kill may land between printing step 1's record and striking it off as printed: the
    # restart then prints it again, marked `recovered` (at least once; a pipe cannot do better).
    again = [m for m in ms if "recovered" in m]
    assert len(again) <= 1 and all(m["step"] == 1 and m["fingerprint"] == first["fingerprint"] for m in again)
    ms = [m for m in ms if "recovered" not in m]
    assert [m["step"] for m in ms] == [2] and ms[0]["batch"]["id"] == json.loads(b2.open().readline())["batch"]["id"]
    assert "resuming from" in p.stderr.decode() and "skipped" in p.stderr.decode()
    assert not list(ck.glob("step-*/unprinted_record.json"))
    # ...and ends where an uninterrupted run ends.
    q = subprocess.run([*cmd[:-len(COMMON) - 2], "--out", str(tmp_path / "whole"), *COMMON],
                       input=b1.read_bytes() + b2.read_bytes(), capture_output=True, env=ENV, timeout=600)
    assert q.returncode == 0, q.stderr.decode()
    want, got = params(tmp_path / "whole" / "step-2"), params(ck / "step-2")
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=0, atol=1e-6), n
    # A run from another policy refuses this --out.
    other = subprocess.run([*MARS, "update", "--follow", "--policy", str(ck / "step-2"), "--out", str(ck), *COMMON],
                           input=b"", capture_output=True, env=ENV, timeout=300)
    assert other.returncode == 2 and b"started from another policy" in other.stderr


def test_bad_batches_in_the_stream(tiny_policy_dir, tmp_path):
    from mars_cli.jsonl import read_file, write_records

    b1 = advantage(judged_file(tiny_policy_dir, tmp_path / "j1.jsonl", "a", 2), tmp_path / "b1.jsonl")
    recs = read_file(b1)
    # A trajectory with no policy token (a prompt over budget): skipped with a warning, the step goes on.
    recs[1]["tokens"]["mask"] = [0] * len(recs[1]["tokens"]["mask"])
    write_records(recs, tmp_path / "empty.jsonl")
    r = H.Ran(["update", "--follow", tmp_path / "empty.jsonl", "--policy", tiny_policy_dir, "--out", tmp_path / "ck", *COMMON])
    assert r.exit_code == 0, r.stderr
    (m,) = metrics(r.stdout)
    assert m["skipped"] == 1 and m["trajectories"] == 3
    assert f"{tmp_path / 'empty.jsonl'}:2: " in r.stderr and "has no policy tokens" in r.stderr
    # A batch where no trajectory has one: a warning, no step, the trainer goes on.
    for rec in recs:
        rec["tokens"]["mask"] = [0] * len(rec["tokens"]["mask"])
    write_records(recs, tmp_path / "allempty.jsonl")
    r = H.Ran(["update", "--follow", tmp_path / "allempty.jsonl", "--policy", tiny_policy_dir, "--out", tmp_path / "ck0", *COMMON])
    assert r.exit_code == 0 and r.stdout == "" and "no trajectory has policy tokens: no step" in r.stderr
    # A token id beyond the vocabulary: a clear error before the step, nothing written.
    recs = read_file(b1)
    recs[2]["tokens"]["ids"][3] = 10 ** 7
    write_records(recs, tmp_path / "oov.jsonl")
    r = H.Ran(["update", "--follow", tmp_path / "oov.jsonl", "--policy", tiny_policy_dir, "--out", tmp_path / "ck2", *COMMON])
    assert r.exit_code == 1 and r.stdout == ""
    assert f"{tmp_path / 'oov.jsonl'}:3: " in r.stderr and "10000000" in r.stderr and "vocabulary" in r.stderr
    assert not (tmp_path / "ck2").exists() or not list((tmp_path / "ck2").iterdir())
    # Records without a batch stamp, an unfinished batch, non-finite flags.
    r = H.Ran(["update", "--follow", "--policy", tiny_policy_dir, "--out", tmp_path / "ck3"],
              input=json.dumps({k: v for k, v in recs[0].items() if k != "batch"}) + "\n")
    assert r.exit_code == 1 and "<stdin>:1: record has no batch stamp" in r.stderr
    r = H.Ran(["update", "--follow", "--policy", tiny_policy_dir, "--out", tmp_path / "ck3"],
              input="".join(json.dumps(x) + "\n" for x in read_file(b1)[:3]))
    assert r.exit_code == 1 and "input ended inside batch" in r.stderr and "3 of 4 records" in r.stderr
    for flag in ("--lr", "--beta"):
        r = H.Ran(["update", "--follow", b1, "--policy", tiny_policy_dir, "--out", tmp_path / "ck4", flag, "nan"])
        assert r.exit_code == 2 and f"{flag} must be a finite number" in r.stderr
    assert not (tmp_path / "ck4").exists()


class FakeServer:
    """A policy server's weight-load endpoint: refuses the first `refuse` loads, then counts versions."""

    def __init__(self, refuse: int = 1):
        self.loads, self.version, self.refuse = [], 0, refuse
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.loads.append(body["checkpoint"])
                if outer.refuse > 0:
                    outer.refuse -= 1
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b'{"error": "checkpoint failed to load"}')
                    return
                outer.version += 1
                reply = json.dumps({"weight_version": outer.version, "fingerprint": body["fingerprint"]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def fake_push_module():
    """mars_cli.serve.push's contract: push_checkpoint(urls, checkpoint, *, fingerprint, api_key, timeout,
    reference, max_gap) (this fake proves nothing: the probe is tests/test_push_probe.py's)."""
    import urllib.error
    import urllib.request

    from mars_cli.errors import MarsError

    mod = types.ModuleType("mars_cli.serve.push")

    class PushError(MarsError):
        results: list = []

    class ProbeError(PushError):
        pass

    def push_checkpoint(urls, checkpoint, *, fingerprint=None, api_key=None, timeout=900.0, reference=None, max_gap=None):
        out, failed = [], []
        for url in urls:
            req = urllib.request.Request(url + "/load", data=json.dumps({"checkpoint": checkpoint, "fingerprint": fingerprint}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    got = json.loads(resp.read())
                out.append({"url": url, "fingerprint": got["fingerprint"], "weight_version": got["weight_version"], "seconds": 0.0})
            except urllib.error.HTTPError as e:
                failed.append(f"{url}: HTTP {e.code}")
        if failed:
            raise PushError("; ".join(failed))
        return out

    mod.PushError, mod.ProbeError, mod.push_checkpoint = PushError, ProbeError, push_checkpoint
    return mod


def test_push_refused_then_retried_with_staleness_save_every_and_keep_last(tiny_policy_dir, tmp_path, monkeypatch):
    from mars_cli.models.load import fingerprint

    monkeypatch.setitem(sys.modules, "mars_cli.serve", types.ModuleType("mars_cli.serve"))
    monkeypatch.setitem(sys.modules, "mars_cli.serve.push", fake_push_module())
    server = FakeServer(refuse=1)
    origin = fingerprint(tiny_policy_dir)
    try:
        # b1, b2 sampled by the starting weights (version 0); the first push is refused, so b2 is
        # one step stale; b3 sampled by version 1 = the weights of step 2 (the second push).
        bs = [advantage(judged_file(tiny_policy_dir, tmp_path / f"j{i}.jsonl", f"g{i}-", 2, policy=pol), tmp_path / f"b{i}.jsonl")
              for i, pol in ((1, {"weight_version": 0, "fingerprint": origin}), (2, {"weight_version": 0, "fingerprint": origin}),
                             (3, {"weight_version": 1}))]
        ck = tmp_path / "ck"
        r = H.Ran(["update", "--follow", *bs, "--policy", tiny_policy_dir, "--out", ck, "--push", server.url,
                   "--save-every", "2", "--keep-last", "2", *COMMON])
        assert r.exit_code == 0, r.stderr
    finally:
        server.close()
    ms = metrics(r.stdout)
    assert [m["step"] for m in ms] == [1, 2, 3]
    assert [m["push"]["ok"] for m in ms] == [False, True, True]
    assert [m["staleness"]["max"] for m in ms] == [0, 1, 0]
    assert "push of" in r.stderr and "the next step pushes again" in r.stderr
    # Step 1 is not saved (--save-every 2): its weights went to OUT/.push; step 3 is the last, saved.
    assert [m["out"] for m in ms] == [None, str(ck / "step-2"), str(ck / "step-3")]
    assert server.loads == [str(ck / ".push"), str(ck / "step-2"), str(ck / "step-3")]
    assert sorted(x.name for x in ck.iterdir() if not x.name.startswith(".")) == ["step-2", "step-3"]
    assert not (ck / "step-2" / "optimizer").exists() and (ck / "step-3" / "optimizer").is_dir()
    assert ms[0]["bytes_written"] > 0 and ms[1]["bytes_written"] > ms[0]["bytes_written"]  # + optimizer state


KILLED_IN_SAVE = """
import os, signal, sys
from pathlib import Path
from mars_cli import fsutil

real = fsutil.replace_dir

def swap_or_die(tmp, dest):
    if Path(dest).name == "optimizer" and Path(dest).parent.name == "step-2":
        os.kill(os.getpid(), signal.SIGKILL)  # step 2's optimizer state written, not yet swapped in
    return real(tmp, dest)

fsutil.replace_dir = swap_or_die
from mars_cli.main import run
run(sys.argv[1:])
"""


def killed_run(policy_dir, tmp_path, prefix: str, script: str):
    """Two batches through `update --follow` under `script` (which kills it somewhere): the
    batches, the --out folder, the command's arguments (to run it again) and the killed run."""
    bs = [advantage(judged_file(policy_dir, tmp_path / f"j{i}.jsonl", f"{prefix}{i}-", 2), tmp_path / f"b{i}.jsonl")
          for i in (1, 2)]
    ck = tmp_path / "ck"
    args = ["update", "--follow", *map(str, bs), "--policy", str(policy_dir), "--out", str(ck), *COMMON]
    p = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV, timeout=600)
    return bs, ck, args, p


def test_kill_while_saving_the_optimizer_state_resumes_from_the_previous_step(tiny_policy_dir, tmp_path):
    from mars_cli.models.load import load_policy

    bs, ck, args, p = killed_run(tiny_policy_dir, tmp_path, "k", KILLED_IN_SAVE)
    assert p.returncode == -9, p.stderr
    # Step 2's weights were written, its optimizer state was not: step 1 still holds a whole one.
    assert (ck / "step-2" / "model.safetensors").is_file() and not (ck / "step-2" / "optimizer").exists()
    assert [x.name for x in (ck / "step-2").iterdir() if x.name.startswith(".optimizer.tmp-")]
    assert (ck / "step-1" / "optimizer" / "mars_state.json").is_file()
    r = subprocess.run([*MARS, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in metrics(r.stdout)] == [2]
    assert "step-2: saved without optimizer state (interrupted): removed, trained again" in r.stderr
    assert sorted(x.name for x in ck.iterdir() if not x.name.startswith(".")) == ["step-1", "step-2"]
    assert (ck / "step-2" / "optimizer").is_dir() and not (ck / "step-1" / "optimizer").exists()
    assert load_policy(ck / "step-2").fingerprint == metrics(r.stdout)[0]["fingerprint"]


def test_bad_data_after_unsaved_steps_saves_the_last_whole_step_first(tiny_policy_dir, tmp_path):
    b1 = advantage(judged_file(tiny_policy_dir, tmp_path / "j1.jsonl", "a", 2), tmp_path / "b1.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "a trajectory"}\n')
    r = H.Ran(["update", "--follow", b1, bad, "--policy", tiny_policy_dir, "--out", tmp_path / "ck", "--save-every", "5",
               *COMMON])
    assert r.exit_code == 1 and f"{bad}:1: record has no batch stamp" in r.stderr
    (m,) = metrics(r.stdout)
    assert m["step"] == 1 and m["out"] is None  # not due for a save when it was taken...
    assert (tmp_path / "ck" / "step-1" / "optimizer" / "mars_state.json").is_file()  # ...saved before the exit


def test_two_ranks_read_the_stream_once_and_equal_one_process(tiny_policy_dir, tmp_path):
    """--nproc 2: rank 0 reads stdin and shares each batch; the steps match one process."""
    b1 = advantage(judged_file(tiny_policy_dir, tmp_path / "j1.jsonl", "a", 2), tmp_path / "b1.jsonl")
    b2 = advantage(judged_file(tiny_policy_dir, tmp_path / "j2.jsonl", "b", 2), tmp_path / "b2.jsonl")
    stream = b1.read_bytes() + b2.read_bytes()
    common = ["update", "--follow", "--policy", str(tiny_policy_dir), "--keep-last", "1", "--zero", "2", "--lr", "1e-3", "--beta", "0"]
    runs = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        p = subprocess.run([*MARS, *common, "--out", str(tmp_path / name), *extra], input=stream, capture_output=True,
                           env=ENV, timeout=600)
        assert p.returncode == 0, p.stderr.decode()
        runs[name] = metrics(p.stdout.decode())
    assert [m["step"] for m in runs["two"]] == [1, 2]  # one record per step, from rank 0 only
    for m1, m2 in zip(runs["one"], runs["two"]):
        assert m1["batch"] == m2["batch"]
        for k in ("loss", "grad_norm", "tokens", "policy_tokens", "trajectories"):
            assert m1[k] == pytest.approx(m2[k], rel=1e-5), k
    a, b = params(tmp_path / "one" / "step-2"), params(tmp_path / "two" / "step-2")
    for n in a:  # the bound of the plain two-process test (Adam's near-zero-gradient noise)
        diff = (a[n] - b[n]).abs()
        assert diff.max() <= 5e-5 and int((diff > 1e-5).sum()) <= max(1, diff.numel() // 1000), n
    assert (tmp_path / "two" / "step-2" / "optimizer" / "mars_state.json").is_file()


KILLED_BEFORE_PRINT = """
import os, signal, sys
from mars_cli.rl import steps

real = steps.keep_unprinted

def keep_then_die(path, record):
    real(path, record)
    if record["step"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # step 1 saved, its record not yet printed (a push would run here)
    return None

steps.keep_unprinted = keep_then_die
from mars_cli.main import run
run(sys.argv[1:])
"""


def test_minor_kill_between_save_and_print_prints_the_record_on_resume(tiny_policy_dir, tmp_path):
    from mars_cli.models.load import load_policy

    bs, ck, args, p = killed_run(tiny_policy_dir, tmp_path, "p", KILLED_BEFORE_PRINT)
    assert p.returncode == -9 and p.stdout == "", p.stderr
    assert (ck / "step-1" / "unprinted_record.json").is_file()
    r = subprocess.run([*MARS, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    ms = metrics(r.stdout)
    assert [m["step"] for m in ms] == [1, 2]  # step 1's record, lost with the kill, comes first
    assert "printed on resume" in ms[0]["recovered"] and "recovered" not in ms[1]
    assert ms[0]["fingerprint"] == load_policy(ck / "step-1").fingerprint and ms[0]["out"] == str(ck / "step-1")
    assert ms[0]["batch"]["id"] == json.loads(bs[0].open().readline())["batch"]["id"] and "loss" in ms[0]
    assert not list(ck.glob("step-*/unprinted_record.json"))  # printed: nothing left to print twice


def test_follow_reads_a_live_pipe_fed_slowly_losing_and_repeating_nothing(tiny_policy_dir, tmp_path):
    """A writer feeds three batches through a real pipe in small pieces that split lines,
    pausing between them, while the trainer steps: every batch is trained once, in order."""
    import time

    bs = [advantage(judged_file(tiny_policy_dir, tmp_path / f"j{i}.jsonl", f"l{i}-", 2), tmp_path / f"b{i}.jsonl")
          for i in (1, 2, 3)]
    ids = [json.loads(b.open().readline())["batch"]["id"] for b in bs]
    cmd = [*MARS, "update", "--follow", "--policy", str(tiny_policy_dir), "--out", str(tmp_path / "ck"), *COMMON]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)

    def writer():
        try:
            for b in bs:
                batch = b.read_bytes()
                for i in range(0, len(batch), 997):  # 997: pieces end mid-line
                    proc.stdin.write(batch[i:i + 997])
                    proc.stdin.flush()
                    time.sleep(0.005)
                time.sleep(2)  # the trainer steps, then waits on an open pipe for the next batch
        finally:
            proc.stdin.close()

    got: dict = {}
    threads = [threading.Thread(target=writer, daemon=True)] + [
        threading.Thread(target=lambda k=k, f=f: got.__setitem__(k, f.read()), daemon=True)
        for k, f in (("out", proc.stdout), ("err", proc.stderr))]  # not communicate(): it would close stdin now
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=600)
    finally:
        proc.kill()
    for t in threads:
        t.join(10)
    out, err = got["out"], got["err"]
    assert proc.returncode == 0, err.decode()
    ms = metrics(out.decode())
    assert [m["step"] for m in ms] == [1, 2, 3] and [m["batch"]["id"] for m in ms] == ids
    assert all(m["batch"]["size"] == 4 and m["skipped"] == 0 for m in ms)


def test_the_stream_says_it_waits_for_input(monkeypatch, capsys):
    """update --follow between steps: a line every progress interval while no record comes."""
    from mars_cli.rl.follow import Stream

    monkeypatch.setenv("MARS_PROGRESS", "log")
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "1")
    r, w = os.pipe()
    stream = Stream([f"/dev/fd/{r}"], skip_bad=False)
    threading.Timer(2.5, lambda: (os.write(w, b'{"a": 1}\n'), os.close(w))).start()
    assert [rec for (_, rec), _ in stream] == [{"a": 1}]
    lines = [x for x in capsys.readouterr().err.splitlines() if "waiting for input" in x]
    assert len(lines) >= 2 and lines[0].endswith("waiting for input (1.0s), 0 records read; a step takes each complete batch")
