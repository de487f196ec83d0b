"""Manifest settings as eval.py and the official loader read them."""

from __future__ import annotations

import pytest

from mars_cli.errors import MarsError
from mars_cli.eval.convert import dataset_settings, repeat_rows


def test_scoring_merges_reward_fn_with_unused_reward_fn():
    assert dataset_settings("v", {"reward_fn": [], "unused_reward_fn": ["em_score_mcq"]}, "m.json")["scorer"] == "mcq"
    s = dataset_settings("f", {"reward_fn": ["llm_score", "format_score"], "unused_reward_fn": []}, "m.json")
    assert s["scorer"] == "llm" and s["score_methods"] == ["llm_score"] and s["repeat_time"] == 1
    both = dataset_settings("b", {"reward_fn": ["llm_score"], "unused_reward_fn": ["em_score_mcq"]}, "m.json")
    assert both["scorer"] == "mcq"  # the rule scorer wins
    with pytest.raises(MarsError, match="unknown scoring method"):
        dataset_settings("x", {"reward_fn": ["f1_score"]}, "m.json")
    with pytest.raises(MarsError, match="repeat_time"):
        dataset_settings("x", {"reward_fn": ["llm_score"], "repeat_time": 0}, "m.json")


def test_repeat_time_whole_and_fractional():
    rows = list(range(10))
    assert repeat_rows(rows, 2, 0, "k") == rows + rows
    half = repeat_rows(rows, 1.5, 0, "k")
    assert half[:10] == rows and len(half) == 15 and len(set(half[10:])) == 5
    assert repeat_rows(rows, 1.5, 0, "k") == half  # seeded
    assert len(repeat_rows(rows, 0.3, 0, "k")) == 3
