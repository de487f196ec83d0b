"""kill -9 at random instants of `update`, `sft` and `index`: what remains loads or resumes.

Each command is run once to completion (its duration sets the range of kill times and
leaves a previous version at the output paths), then started again and SIGKILLed after
random delays, three times. After every kill the outputs must load (old or new version,
never neither), and the temporaries the killed process left must be gone once something
has read the outputs. Finally a run resumes from what is there. The seed is printed on
failure; MARS_CRASH_SEED repeats a run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import helpers_train as H

PY = sys.executable
KILLS = 3
SEED = int(os.environ.get("MARS_CRASH_SEED", time.time_ns() % 1_000_000))


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}


def _run(args) -> float:
    t0 = time.monotonic()
    p = subprocess.run([PY, "-m", "mars_cli", *map(str, args)], capture_output=True, text=True, timeout=600, env=_env())
    assert p.returncode == 0, p.stderr
    return time.monotonic() - t0


def _killed(args, delay: float) -> None:
    proc = subprocess.Popen([PY, "-m", "mars_cli", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def _delays(rng: random.Random, duration: float) -> list[float]:
    # Most of a run is start-up; the writes come at the end, so the last third gets most kills.
    return sorted([rng.uniform(0.5, 0.95) * duration] + [rng.uniform(0.7, 1.05) * duration for _ in range(KILLS - 1)])


def _hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _check_trainer_outputs(tmp_path, out, state, steps: set, msg: str) -> None:
    from mars_cli.models.load import load_policy
    from mars_cli.rl.checkpoint import read_meta
    from mars_cli.rl.engine import read_state_meta

    pol = load_policy(out)  # recovers an interrupted swap first
    assert read_meta(out)["step"] in steps, msg
    meta = read_state_meta(state)
    assert meta.get("step") in steps and (state / "state").is_dir(), msg
    assert pol.fingerprint
    assert _hidden(tmp_path) == [], msg  # no backup, journal or temporary of the killed run is left


@pytest.mark.slow
@pytest.mark.parametrize("command", ["update", "sft"])
def test_kill_9_during_training_leaves_a_loadable_checkpoint_and_state(tiny_policy_dir, tmp_path, command):
    rng = random.Random(f"{SEED}-{command}")
    batch = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", [1.0, -1.0])
    out, state = tmp_path / "ckpt", tmp_path / "state"
    args = [command, batch, "--policy", tiny_policy_dir, "--out", out, "--state", state, "--lr", "1e-4"]
    if command == "sft":
        args += ["--no-eval", "--batch-size", "1"]
    duration = _run(args)
    first = json.loads((out / "mars_meta.json").read_text())["step"]
    for delay in _delays(rng, duration):
        _killed(args, delay)
        _check_trainer_outputs(tmp_path, out, state, {first, first + 1},
                               f"seed {SEED}: kill after {delay:.2f}s of a {duration:.2f}s run")
    if command == "sft":
        return  # the same state machinery; resuming is shown once, with update
    # And the next run goes on from the state that survived, with the checkpoint it belongs to.
    from mars_cli.rl.engine import read_state_meta

    policy = read_state_meta(state)["checkpoint"]
    _run([command, batch, "--policy", policy, "--out", tmp_path / "next", "--state", state, "--lr", "1e-4"])
    assert read_state_meta(state)["step"] > first


@pytest.mark.slow
def test_kill_9_during_index_leaves_a_loadable_index(tmp_path):
    from mars_cli.tools.index_text import TextIndex

    rng = random.Random(f"{SEED}-index")
    corpus = tmp_path / "corpus.jsonl"
    words = ["mill", "sign", "yard", "river", "tower", "market", "bridge", "harbor"]
    with corpus.open("w") as f:
        for i in range(40_000):
            text = " ".join(rng.choice(words) + str(rng.randrange(500)) for _ in range(30))
            f.write(json.dumps({"id": str(i), "title": f"doc {i}", "text": text}) + "\n")
    out = tmp_path / "idx"
    args = ["index", "text", corpus, "--out", out]
    duration = _run(args)
    expected = TextIndex(out).n
    for delay in _delays(rng, duration):
        _killed(args, delay)
        idx = TextIndex(out)
        assert idx.n == expected, f"seed {SEED}: kill after {delay:.2f}s of {duration:.2f}s"
        assert _hidden(tmp_path) == [], f"seed {SEED}: kill after {delay:.2f}s"
