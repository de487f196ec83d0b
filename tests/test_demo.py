"""The README's first command: the offline demo, end to end, at a small size."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"DEMO_TASKS": "12", "DEMO_TEST_FRACTION": "0.3", "DEMO_VAL_FRACTION": "0.1", "DEMO_RL_STEPS": "2",
         "DEMO_EVAL_EVERY": "1", "DEMO_SAMPLES": "2", "DEMO_RL_TASKS": "2", "DEMO_EVAL_SAMPLES": "1",
         "DEMO_SFT_EPOCHS": "1"}


def run_demo(work: Path, **sizes: str) -> subprocess.CompletedProcess:
    """The demo at the small size (`sizes` override it), its work in `work`."""
    if not (ROOT / ".venv" / "bin" / "mars").exists():
        pytest.skip("the demo installs into .venv; run scripts/bootstrap.sh first")
    env = {**os.environ, "MARS_DEMO_DIR": str(work), **SMALL, **sizes}
    return subprocess.run(["bash", str(ROOT / "examples" / "offline_demo.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_offline_demo_runs_the_whole_recipe(tmp_path):
    work = tmp_path / "demo"
    p = run_demo(work)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[0].split() == ["stage", "episodes", "format", "accuracy", "tools/ep", "reward"]
    assert [l.split()[0] for l in lines[1:4]] == ["sft", "rl-1", "rl"]
    assert lines[4].startswith("accuracy gain rl - sft:") and "95% paired bootstrap interval" in lines[4]
    # one overall record per stage (all held-out tasks are one benchmark), rl written last
    metrics = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    overall = [m for m in metrics if m.get("by") is None]
    assert [m["label"] for m in overall] == ["sft", "rl-1", "rl"] and metrics[-1]["label"] == "rl"
    assert [m["step"] for m in overall] == [0, 1, 2]  # mars eval --step: evals stand on the training step
    assert len({m["benchmark"] for m in overall}) == 1
    test_tasks = (work / "data" / "test" / "tasks.jsonl").read_text().splitlines()
    assert all(m["episodes"] == len(test_tasks) for m in overall)
    # the RL steps really trained, on training tasks only; the last checkpoint is kept
    updates = [json.loads(l) for l in (work / "update-metrics.jsonl").read_text().splitlines()]
    assert [u["step"] for u in updates] == [1, 2] and updates[-1]["trajectories"] > 0
    assert all(u["push"]["ok"] for u in updates)  # every step reached the policy server
    assert (work / "rl" / "step-2" / "config.json").exists() and (work / "rl" / "step-1" / "config.json").exists()
    held_out = {json.loads(l)["id"] for l in test_tasks}
    trained = {json.loads(l)["id"] for l in (work / "rl-tasks.jsonl").read_text().splitlines()}
    assert trained and not trained & held_out
    sft_tasks = {json.loads(l)["id"] for l in (work / "sft-references.jsonl").read_text().splitlines()}
    assert sft_tasks and not sft_tasks & held_out and not sft_tasks & trained
    assert not _running(work)  # the policy server is gone
    assert (work / "episodes.html").stat().st_size > 1000
    assert (work / "run.html").read_text().count("<svg") >= 6  # RL and eval curves
    assert (work / "sft.html").read_text().count("<svg") >= 1


def _running(work: Path) -> list[str]:
    """Processes whose command line names the demo folder."""
    p = subprocess.run(["pgrep", "-af", str(work)], capture_output=True, text=True)
    return [line for line in p.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.slow
def test_a_failing_rl_step_stops_the_server_and_fails_the_demo(tmp_path):
    work = tmp_path / "demo"
    p = run_demo(work, DEMO_EVAL_EVERY="0", DEMO_RL_LR="nan")
    assert p.returncode != 0 and "--lr" in p.stderr
    assert (work / "serve.json").exists()  # the server had started
    assert not _running(work)


def test_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    env = {**os.environ, "MARS_DEMO_DIR": str(precious)}
    # bootstrap is skipped by pointing it at a no-op: the guard runs before any work.
    p = subprocess.run(["bash", "-c", f"sed 's#^scripts/bootstrap.sh#true#' {ROOT}/examples/offline_demo.sh | bash -s"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "not a demo folder" in p.stderr
    assert (precious / "thesis.tex").read_text() == "do not delete"
