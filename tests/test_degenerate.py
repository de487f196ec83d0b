"""Degenerate batches (every group's rewards equal, all advantages 0) are said out loud."""

from __future__ import annotations

import json

import helpers_train as H
from clirun import Ran


def judged(group, sample, reward):
    return {"schema_version": 1, "id": group, "question": "q", "group": group, "sample": sample, "messages": [],
            "tool_calls": [], "prediction": "x", "finish": "answer", "rewards": {"accuracy": reward}, "reward": reward}


def test_advantage_warns_when_every_group_is_constant(tmp_path):
    f = tmp_path / "j.jsonl"
    f.write_text("".join(json.dumps(judged(g, s, r)) + "\n" for g, r in (("a", 1.0), ("b", 0.0)) for s in range(4)))
    r = Ran(["advantage", f])
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout.splitlines()) == 8  # still written: a pipeline does not break on it
    assert "mars advantage: all 8 advantages are 0: every group's rewards are equal" in r.stderr
    f.write_text("".join(json.dumps(judged("a", s, float(s % 2))) + "\n" for s in range(4)))
    r = Ran(["advantage", f])
    assert r.exit_code == 0 and "advantages are 0" not in r.stderr


def test_update_warns_and_still_writes(tiny_policy_dir, tmp_path):
    batch = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", [0.0, 0.0])
    r = Ran(["update", batch, "--policy", tiny_policy_dir, "--out", tmp_path / "o", "--beta", "0"])
    assert r.exit_code == 0, r.stderr
    assert "mars update: all 2 advantages are 0 (every group's rewards were equal)" in r.stderr
    assert (tmp_path / "o" / "config.json").exists()
