"""Every stage of `rollout --loop | tee | judge | tee | advantage | tee | update --follow` ends by itself.

`tee` between the stages hides a reader that is gone until tee next writes, so a rollout
waiting for weights learns that none will come from the trainer's lease on the server
(serve/lease.py): "done" when update ends, "lost" when it was killed. One server and one
task set serve every case; each case is its own pipeline, run to its end or killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_loop_pipeline import small_tasks

pytestmark = [pytest.mark.network, pytest.mark.slow]

STAGES = ("rollout", "judge", "advantage", "update")
SUMMARY = {"rollout": " episodes: ", "judge": " records in ", "advantage": " records written in ",
           "update": "follow: "}


@pytest.fixture(scope="module")
def served(tiny_policy_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline-end")
    policy = tmp / "policy"  # beside the step folders: the server's default --allow-load
    shutil.copytree(tiny_policy_dir, policy)
    tasks = small_tasks(tmp)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1",
           "MARS_PROGRESS": "log"}
    for k in ("MARS_SERVE_API_KEY", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    server = subprocess.Popen([sys.executable, "-m", "mars_cli", "serve", "--policy", str(policy), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        url = json.loads(server.stdout.readline())["url"]
        yield {"url": url, "policy": policy, "tasks": tasks, "env": env, "tmp": tmp}
    finally:
        server.terminate()
        server.wait(timeout=60)


class Pipeline:
    """The four stages with `tee` between each two, as Popen objects (so any one can be killed)."""

    def __init__(self, s: dict, name: str, max_steps: int):
        tmp, mars = s["tmp"] / name, [sys.executable, "-m", "mars_cli"]
        tmp.mkdir()
        self.dir = tmp
        argv = {
            "rollout": [*mars, "rollout", "--server", s["url"], "-n", "2", "--group-order", "--loop", "--batch-groups", "2",
                        "--seed", "1", "--max-turns", "2", "--max-new-tokens", "6", "--index", str(s["tmp"] / "idx"),
                        str(s["tasks"])],
            "judge": [*mars, "judge"],
            "advantage": [*mars, "advantage", "--batch-groups", "2", "--group-size", "2"],
            "update": [*mars, "update", "--follow", "--policy", str(s["policy"]), "--out", str(s["tmp"] / f"ck-{name}"),
                       "--push", s["url"], "--max-steps", str(max_steps), "--lr", "1e-3", "--beta", "0"],
        }
        self.procs: dict[str, subprocess.Popen] = {}
        upstream = None
        for i, stage in enumerate(STAGES):
            last = stage == "update"
            out = open(tmp / "metrics.jsonl", "wb") if last else subprocess.PIPE
            p = subprocess.Popen(argv[stage], stdin=upstream or subprocess.DEVNULL, stdout=out,
                                 stderr=open(tmp / f"{stage}.err", "wb"), env=s["env"])
            if upstream is not None:
                upstream.close()
            self.procs[stage] = p
            if not last:
                tee = subprocess.Popen(["tee", str(tmp / f"{stage}.jsonl")], stdin=p.stdout, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL)
                p.stdout.close()
                self.procs[f"tee-{stage}"] = tee
                upstream = tee.stdout

    def wait(self, timeout: float) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        return codes

    def stderr(self, stage: str) -> str:
        return (self.dir / f"{stage}.err").read_text()

    def metrics(self) -> list[dict]:
        return [json.loads(x) for x in (self.dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("max_steps", [1, 2, 3, 4])
def test_max_steps_ends_every_stage_with_its_summary(served, max_steps):
    pipe = Pipeline(served, f"steps-{max_steps}", max_steps)
    codes = pipe.wait(timeout=420)
    assert all(c is not None for c in codes.values()), (codes, {s: pipe.stderr(s)[-600:] for s in STAGES})
    assert [m["step"] for m in pipe.metrics()] == list(range(1, max_steps + 1))
    # Each stage ended on its input (the lease's "done" ended the rollout): status 0 and its summary.
    assert all(c == 0 for c in codes.values()), (codes, {s: pipe.stderr(s)[-600:] for s in STAGES})
    for stage in STAGES:
        assert SUMMARY[stage] in pipe.stderr(stage).splitlines()[-1], (stage, pipe.stderr(stage)[-600:])
    assert "the trainer ended: no new weights will come" in pipe.stderr("rollout")


@pytest.mark.parametrize("victim", STAGES)
def test_kill_9_of_any_stage_ends_the_others(served, victim):
    pipe = Pipeline(served, f"kill-{victim}", 50)
    deadline = time.monotonic() + 300
    while not pipe.metrics() and time.monotonic() < deadline and pipe.procs["update"].poll() is None:
        time.sleep(0.5)
    assert pipe.metrics(), pipe.stderr("update")[-2000:]  # one step taken: every stage is running
    pipe.procs[victim].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    codes = pipe.wait(timeout=120)  # a killed trainer's lease runs out after 20 s
    assert all(c is not None for c in codes.values()), (codes, time.monotonic() - t0)
    for stage in STAGES:
        if stage == victim:
            assert codes[stage] == -signal.SIGKILL
            continue
        err = pipe.stderr(stage)
        # Every other stage ends with status 0 and its summary line: on its input, or (a
        # stage whose reader is gone) on the closed pipe, saying so.
        assert codes[stage] == 0, (stage, codes, err[-600:])
        assert SUMMARY[stage] in err, (stage, err[-600:])  # a stage whose reader went away says so too
    if victim == "update":
        assert "the trainer stopped calling its servers" in pipe.stderr("rollout")
