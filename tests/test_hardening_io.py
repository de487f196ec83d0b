"""Regressions of the hardening pass, process side: streams, writes, flags, signals, training inputs.

Each test is named after the failure it guards against (the item's code in brackets).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clirun import Ran

PY = sys.executable


def mars(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "mars_cli", *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


def _judged(path, n=2, group="g"):
    recs = [{"id": group, "question": "q", "answers": ["a"], "group": group, "sample": i, "messages": [], "tool_calls": [],
             "prediction": "a", "finish": "answer", "rewards": {"accuracy": float(i % 2)}, "reward": float(i % 2)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# -- C3: closed standard streams ------------------------------------------------------------

@pytest.mark.parametrize("args,redirect,msg", [
    (["judge", "X"], "stdout", "mars judge: standard output is closed"),
    (["judge", "--help"], "stdout", "mars: standard output is closed"),
    (["advantage"], "stdin", "mars advantage: <stdin>: standard input is closed"),
])
def test_c3_closed_stdin_or_stdout_is_one_line_not_a_traceback(tmp_path, args, redirect, msg):
    f = _judged(tmp_path / "j.jsonl")
    args = [str(f) if a == "X" else a for a in args]
    fd = 1 if redirect == "stdout" else 0
    p = subprocess.run([PY, "-m", "mars_cli", *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       timeout=120, pass_fds=(), preexec_fn=lambda: os.close(fd))
    assert p.returncode == 1 and p.stderr.startswith(msg) and len(p.stderr.splitlines()) == 1


# -- C4: one writer path ------------------------------------------------------------------

@pytest.mark.parametrize("command", [["eval"], ["judge"], ["advantage"], ["show"]])
def test_c4_write_to_dev_full_is_one_line_exit_1(tmp_path, command):
    f = _judged(tmp_path / "j.jsonl")
    p = mars(*command, f, "-o", "/dev/full")
    assert p.returncode == 1 and p.stderr.strip().endswith("/dev/full: no space left on device"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and os.path.exists("/dev/full") and not os.path.isfile("/dev/full")
    if command != ["show"]:  # records on a full stdout
        with open("/dev/full", "w") as full:
            p = subprocess.run([PY, "-m", "mars_cli", *command, str(f)], stdout=full, stderr=subprocess.PIPE, text=True,
                               timeout=120)
        assert p.returncode == 1 and "<stdout>: no space left on device" in p.stderr and "Traceback" not in p.stderr


def test_c4_unwritable_output_directory_is_named_before_any_work(tmp_path):
    f = _judged(tmp_path / "j.jsonl")
    for out, msg in [("/proc/x.jsonl", "/proc/x.jsonl: cannot write in /proc"), (f"{f}/x", f"{f}/x: {f} is not a directory")]:
        r = Ran(["eval", f, "-o", out])
        assert r.exit_code == 1 and msg in r.stderr
    r = Ran(["update", f, "--policy", tmp_path / "nope", "--out", "/proc/ckpt"])
    assert r.exit_code == 1 and "/proc/ckpt: cannot write in /proc" in r.stderr  # before loading any policy


def test_c4_fifo_output_is_written_in_place_and_never_replaced(tmp_path):
    f = _judged(tmp_path / "j.jsonl")
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    r = Ran(["advantage", f, "-o", fifo])
    got = reader.communicate(timeout=60)[0]
    assert r.exit_code == 0 and len(got.splitlines()) == 2 and not fifo.is_file() and fifo.exists()
    r = Ran(["index", "text", f, "--out", fifo])  # a directory output never replaces a FIFO
    assert r.exit_code == 1 and f"{fifo}: exists and is not a directory" in r.stderr


# -- W3, C9: numeric flags ----------------------------------------------------------------

@pytest.mark.parametrize("args,flag", [
    (["advantage", "--eps", "-1"], "--eps"), (["advantage", "--eps", "nan"], "--eps"),
    (["rollout", "--temperature", "inf"], "--temperature"), (["update", "--lr", "nan"], "--lr"),
    (["update", "--lr", "0"], "--lr"), (["sft", "--warmup", "1"], "--warmup"), (["judge", "--timeout", "-inf"], "--timeout"),
])
def test_w3_c9_out_of_range_and_non_finite_flags_are_usage_errors(args, flag):
    r = Ran(args)
    assert r.exit_code == 2 and f"{flag} must be " in r.stderr


def test_w3_every_numeric_flag_has_a_checked_range_or_is_declared_unbounded():
    import typer

    from mars_cli import flagchecks as F
    from mars_cli.main import app

    unchecked = []
    for path, p in F.walk(typer.main.get_command(app)):
        if F.numeric_kind(getattr(getattr(p, "type_descriptor", None), "annotation", None)) is None:
            continue
        k = F.key(path, p)
        if k not in F.RANGES and k not in F.UNBOUNDED and getattr(p, "min", None) is None and getattr(p, "max", None) is None:
            unchecked.append(k)
    assert not unchecked, f"numeric flags without a range (add them to flagchecks.RANGES or UNBOUNDED): {unchecked}"


# -- C9: corrupt index manifest -----------------------------------------------------------

@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "mars-text-index"}'])
def test_c9_corrupt_index_manifest_is_one_line(tmp_path, content):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "1", "title": "t", "text": "red sign in the mill"}) + "\n")
    assert Ran(["index", "text", corpus, "--out", tmp_path / "idx"]).exit_code == 0
    (tmp_path / "idx" / "manifest.json").write_text(content)
    r = Ran(["search", "red", "--index", tmp_path / "idx"])
    assert r.exit_code == 1 and str(tmp_path / "idx") in r.stderr and "Traceback" not in r.stderr


# -- K1: Ctrl-C in the judge ---------------------------------------------------------------

def test_k1_ctrl_c_in_judge_leaves_no_pending_task_noise(tmp_path):
    from fakeservers import FakeServer, openai_routes

    recs = tmp_path / "t.jsonl"
    recs.write_text("".join(json.dumps({"id": f"t{i}", "question": "q", "answers": ["gold"], "scorer": "llm", "group": f"t{i}",
                                        "sample": 0, "messages": [], "tool_calls": [], "prediction": "other",
                                        "finish": "answer"}) + "\n" for i in range(40)))
    with FakeServer(openai_routes(lambda p: "<verdict>yes</verdict>"), timeout_sleep=30) as srv:
        srv.faults += ["timeout"] * 40
        proc = subprocess.Popen([PY, "-m", "mars_cli", "judge", str(recs), "--judge-base-url", srv.url + "/v1",
                                 "--judge-model", "m", "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while len(srv.calls) < 8 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert "Task was destroyed" not in err and "was never awaited" not in err and "Traceback" not in err


# -- K3: warnings from tool threads name the command ---------------------------------------

def test_k3_warnings_from_worker_threads_name_the_command():
    import threading

    from mars_cli import streams

    lines = []
    token = streams.set_program("mars rollout")
    real = sys.stderr
    try:
        sys.stderr = type("W", (), {"write": lambda self, s: lines.append(s), "flush": lambda self: None})()
        t = threading.Thread(target=streams.warn, args=("search timed out",))
        t.start()
        t.join()
    finally:
        sys.stderr = real
        streams.reset_program(token)
    assert lines == ["mars rollout: search timed out\n"]


# -- W5: a missing policy directory ------------------------------------------------------

def test_w5_missing_policy_directory_is_reported_as_such(tmp_path):
    from mars_cli.errors import MarsError
    from mars_cli.models.load import load_tokenizer

    with pytest.raises(MarsError, match="no such model directory"):
        load_tokenizer(tmp_path / "nope")
