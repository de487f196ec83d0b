"""The README's first command: the offline demo, end to end, at a small size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_offline_demo_runs_the_whole_recipe(tmp_path):
    if not (ROOT / ".venv" / "bin" / "mars").exists():
        pytest.skip("the demo installs into .venv; run scripts/bootstrap.sh first")
    work = tmp_path / "demo"
    env = {**os.environ, "MARS_DEMO_DIR": str(work), "DEMO_TASKS": "6", "DEMO_TEST_FRACTION": "0.4", "DEMO_RL_STEPS": "1",
           "DEMO_SAMPLES": "2", "DEMO_SFT_EPOCHS": "1", "DEMO_RL_TASKS": "2"}
    p = subprocess.run(["bash", str(ROOT / "examples" / "offline_demo.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[0].split() == ["stage", "episodes", "format", "accuracy", "tools/ep", "reward"]
    assert [l.split()[0] for l in lines[1:]] == ["random", "sft", "rl"]
    metrics = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert [m["label"] for m in metrics if m.get("subset") in (None, "all")] == ["random", "sft", "rl"]
    # The RL step really trained: one update record with a checkpoint behind it.
    update = json.loads((work / "update-metrics.jsonl").read_text().splitlines()[-1])
    assert update["trajectories"] > 0 and (work / "policy-rl-1" / "config.json").exists()
    assert (work / "episodes.html").stat().st_size > 1000
    assert (work / "run.html").read_text().count("<svg") >= 6  # training and eval curves


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
