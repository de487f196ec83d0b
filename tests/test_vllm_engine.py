"""`mars rollout --engine vllm`: the real vLLM in process, checked token for token and against the trainer."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers_rollout import make_image
from vllm_tier import ENV, GAP_BOUND, MARS, tier, tiny, trajectories_gap

pytestmark = [*tier, pytest.mark.slow]


def test_in_process_rollout_passes_check_and_matches_the_trainer(tmp_path):
    from mars_cli.jsonl import write_records
    from mars_cli.records import make_task

    policy = tiny(tmp_path / "m", 0)
    imgs = [make_image(tmp_path / f"img{i}.jpg", size=(112 + 28 * i, 84)) for i in range(2)]
    tasks = tmp_path / "tasks.jsonl"
    write_records([make_task(f"t{i}", f"What is in picture {i}?", images=[im], answers=["x"])
                   for i, im in enumerate(imgs)], tasks)
    out = tmp_path / "traj.jsonl"
    r = subprocess.run([*MARS, "rollout", "--engine", "vllm", "--policy", str(policy), "--dtype", "float32",
                        str(tasks), "-n", "2", "--max-turns", "2", "--max-new-tokens", "16", "--seed", "0",
                        "-o", str(out)], capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((x["group"], x["sample"]) for x in recs) == [("t0", 0), ("t0", 1), ("t1", 0), ("t1", 1)]
    assert all(x["policy"]["engine"] == "vllm" and x["finish"] != "error" for x in recs)
    c = subprocess.run([*MARS, "rollout", "--check", "--policy", str(policy), str(out)], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert c.returncode == 0, c.stderr[-3000:]
    assert trajectories_gap(policy, recs) <= GAP_BOUND
