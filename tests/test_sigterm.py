"""SIGTERM ends a pipeline stage as Ctrl-C does: its cleanup, its summary line, exit 143.

Each stage is started on an open pipe, given work (or none), and sent SIGTERM while it
waits for more input, as a supervisor (`kill`, systemd, `docker stop`) would stop it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_loop_pipeline import small_tasks
from test_update_follow import judged_file

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "MARS_PROGRESS": "log",
       "MARS_PROGRESS_INTERVAL": "1", "OMP_NUM_THREADS": "1"}
for _k in ("MARS_JUDGE_BASE_URL", "MARS_JUDGE_MODEL", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
    ENV.pop(_k, None)  # the offline rule judge; one process


def started(argv: list, feed: bytes = b"") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "mars_cli", *map(str, argv)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    if feed:
        p.stdin.write(feed)
        p.stdin.flush()
    return p  # stdin stays open: the stage waits for more


def wait_for(stream, what: bytes, timeout: float = 240.0) -> bytes:
    """Read `stream` until `what` has appeared (the stage has reached its waiting state)."""
    got, deadline = b"", time.monotonic() + timeout
    while what not in got and time.monotonic() < deadline:
        if select.select([stream], [], [], 0.5)[0]:
            chunk = os.read(stream.fileno(), 1 << 16)
            if not chunk:
                break
            got += chunk
    assert what in got, got[-2000:]
    return got


def terminated(p: subprocess.Popen, err_so_far: bytes = b"") -> str:
    """SIGTERM with the input still open (an end of input would end the stage by itself)."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=60)
    finally:
        p.kill()
    err = p.stderr.read()
    p.stdin.close()
    assert p.returncode == 143, (p.returncode, err[-2000:])
    return (err_so_far + err).decode()


def test_rollout_then_judge_terminated_while_waiting_say_what_they_did(tiny_policy_dir, tmp_path):
    tasks = small_tasks(tmp_path)
    first = tasks.read_bytes().splitlines(keepends=True)[0]
    roll = started(["rollout", "--policy", tiny_policy_dir, "-n", "1", "--max-turns", "1", "--max-new-tokens", "4",
                    "--index", tmp_path / "idx"], first)
    trajectory = wait_for(roll.stdout, b"\n").splitlines()[0]
    time.sleep(1.0)  # the episode counted once its record is out
    err = terminated(roll)
    assert "1 episodes: " in err and err.rstrip().endswith("mars rollout: terminated"), err
    assert "Traceback" not in err and "never retrieved" not in err, err

    judge = started(["judge"], trajectory + b"\n")
    assert json.loads(wait_for(judge.stdout, b"\n").splitlines()[0])["reward"] is not None
    time.sleep(1.0)  # back to reading: the record counted
    err = terminated(judge)
    last = ["", *err.rstrip().splitlines()]
    assert last[-1] == "mars judge: terminated"
    assert last[-2].startswith("mars judge: 1 record in ") and last[-2].endswith("waiting for input); terminated"), err


def test_advantage_and_follow_terminated_while_waiting(tiny_policy_dir, tmp_path):
    judged = judged_file(tiny_policy_dir, tmp_path / "judged.jsonl", "a", 1).read_bytes().splitlines(keepends=True)
    adv = started(["advantage", "--group-size", "2"], judged[0])  # half a group: nothing to write yet
    err = wait_for(adv.stderr, b"waiting for input")
    err = terminated(adv, err)
    last = ["", *err.rstrip().splitlines()]
    assert last[-1] == "mars advantage: terminated"
    assert last[-2].startswith("mars advantage: 1 record in ") and last[-2].endswith("; terminated"), err

    follow = started(["update", "--follow", "--policy", tiny_policy_dir, "--out", tmp_path / "ck"])
    err = wait_for(follow.stderr, b"waiting for input")
    err = terminated(follow, err)
    last = ["", *err.rstrip().splitlines()]
    assert last[-1] == "mars update: terminated"
    assert last[-2].startswith("mars update: follow: 0 steps in ") and last[-2].endswith("(terminated)"), err


def test_follow_on_two_ranks_passes_sigterm_to_every_rank(tiny_policy_dir, tmp_path):
    """`update --follow --nproc 2`: SIGTERM to the command reaches its launcher and each rank;
    rank 0 saves its last whole step and says so, and no process is left behind."""
    import psutil

    from test_update_follow import advantage

    batch = advantage(judged_file(tiny_policy_dir, tmp_path / "j.jsonl", "a", 2), tmp_path / "b.jsonl")
    follow = started(["update", "--follow", "--nproc", "2", "--policy", tiny_policy_dir, "--out", tmp_path / "ck",
                      "--save-every", "5", "--lr", "1e-3", "--beta", "0"], batch.read_bytes())
    assert json.loads(wait_for(follow.stdout, b"\n", timeout=300).splitlines()[0])["step"] == 1
    family = psutil.Process(follow.pid).children(recursive=True)
    assert len(family) >= 3  # the launcher and its two ranks
    err = terminated(follow)
    assert "follow: 1 step in " in err and "(terminated)" in err, err
    assert (tmp_path / "ck" / "step-1" / "optimizer" / "mars_state.json").is_file(), err  # saved on the way out
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
