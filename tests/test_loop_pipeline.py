"""The RL loop as one pipeline: rollout --server --loop | judge | advantage | update --follow --push."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import helpers_train as H

pytestmark = [pytest.mark.network, pytest.mark.slow]


def small_tasks(tmp_path: Path) -> Path:
    """The synthetic benchmark with its 4K images cut down: the loop is tested, not preprocessing."""
    from PIL import Image

    assert H.Ran(["data", "synth", "-o", tmp_path / "synth", "-n", "4", "--seed", "0"]).exit_code == 0
    assert H.Ran(["index", "text", tmp_path / "synth" / "corpus.jsonl", "--out", tmp_path / "idx"]).exit_code == 0
    lines = []
    for line in (tmp_path / "synth" / "tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        small = []
        for p in task["images"]:
            with Image.open(p) as im:
                im.thumbnail((224, 224))
                q = tmp_path / f"small-{Path(p).name}"
                im.save(q)
            small.append(str(q))
        lines.append(json.dumps({**task, "images": small}))
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "tasks.jsonl"


def test_three_steps_end_to_end_against_mars_serve_then_every_stage_ends(tiny_policy_dir, tmp_path):
    import shutil

    from mars_cli.models.load import fingerprint

    policy = tmp_path / "policy"  # beside the step folders: the server's default --allow-load
    shutil.copytree(tiny_policy_dir, policy)
    tasks = small_tasks(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("MARS_SERVE_API_KEY", None)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)  # set in this process by earlier in-process trainers, whose store may still hold the port
    server = subprocess.Popen([sys.executable, "-m", "mars_cli", "serve", "--policy", str(policy), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        url = json.loads(server.stdout.readline())["url"]
        mars = f"{sys.executable} -m mars_cli"
        ck = tmp_path / "ck"
        cmd = (f"{mars} rollout --server {url} -n 2 --group-order --loop --batch-groups 2 --seed 1 --max-turns 2 "
               f"--max-new-tokens 12 --index {tmp_path / 'idx'} < {tasks} 2> {tmp_path / 'rollout.err'} "
               f"| {mars} judge | {mars} advantage --batch-groups 2 --group-size 2 "
               f"| {mars} update --follow --policy {policy} --out {ck} --push {url} --max-steps 3 --keep-last 2 "
               f"--lr 1e-3 --beta 0")
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env, timeout=1200)
        health = httpx.get(url + "/health", timeout=30).json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    # Every stage ended, with status 0 (pipefail), once update had taken its three steps.
    assert p.returncode == 0, p.stderr
    ms = [json.loads(x) for x in p.stdout.splitlines()]
    assert [m["step"] for m in ms] == [1, 2, 3] and all(m["batch"]["size"] == 4 for m in ms)
    assert all(m["push"]["ok"] for m in ms) and [m["push"]["weight_version"] for m in ms] == [2, 3, 4]
    # One step off: batch 1 was sampled by the starting weights, later ones at most one step behind.
    assert ms[0]["staleness"] == {"mean": 0.0, "max": 0, "min": 0, "known": 4}
    assert all(m["staleness"]["known"] == 4 and m["staleness"]["max"] <= 1 for m in ms[1:])
    assert sorted(x.name for x in ck.iterdir() if not x.name.startswith(".")) == ["step-2", "step-3"]
    # The servers serve the last step's weights.
    assert health.get("fingerprint") == fingerprint(ck / "step-3") == ms[2]["fingerprint"]
