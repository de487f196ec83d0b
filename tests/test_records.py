"""The record contract: validation messages name the field and the place."""

import pytest

from mars_cli import records
from mars_cli.errors import MarsError, RecordError
from mars_cli.jsonl import Where


def traj(**over):
    rec = records.make_task("t1", "what?", answers=["x"])
    rec.update(group="t1", sample=0, messages=[], tool_calls=[], prediction="x", finish="answer",
               tokens={"ids": [1, 2], "mask": [0, 1], "logprobs": [0.0, -0.5]})
    rec.update(over)
    return rec


def test_make_task_is_valid_and_ordered():
    t = records.make_task("a", "q", images=["i.jpg"], answers=["y"], scorer="em")
    assert list(t)[:3] == ["schema_version", "id", "question"]
    records.validate(t, "task")


def test_missing_required_field_names_field_and_line():
    with pytest.raises(RecordError) as e:
        records.validate({"id": "a"}, "task", Where("tasks.jsonl", 7))
    assert str(e.value) == "tasks.jsonl:7: missing field 'question' (a task record needs it)"


def test_wrong_type_is_described():
    with pytest.raises(MarsError, match="field 'answers' must be a list of gold answer strings"):
        records.validate({"id": "a", "question": "q", "answers": "x"}, "task")


def test_bad_scorer():
    with pytest.raises(MarsError, match="field 'scorer' must be one of"):
        records.validate({"id": "a", "question": "q", "scorer": "vibes"}, "task")


def test_trajectory_checks_token_lengths():
    records.validate(traj(), "trajectory")
    with pytest.raises(MarsError, match="field 'tokens'"):
        records.validate(traj(tokens={"ids": [1, 2], "mask": [1]}), "trajectory")
    records.validate(traj(tokens=None), "trajectory")  # openai engine: not trainable


def test_finish_reason_must_be_known():
    with pytest.raises(MarsError, match="field 'finish'"):
        records.validate(traj(finish="tired"), "trajectory")


def test_judged_and_scored():
    j = traj(rewards={"accuracy": 1.0, "format": None}, reward=1.0)
    records.validate(j, "judged")
    with pytest.raises(MarsError, match="missing field 'advantage'"):
        records.validate(j, "scored")
    records.validate({**j, "advantage": -0.3}, "scored")
    with pytest.raises(MarsError, match="field 'rewards'"):
        records.validate(traj(rewards={"accuracy": "yes"}, reward=1.0), "judged")


def test_only_restricts_the_check():
    records.validate({"group": "g", "reward": 1.0}, "judged", only=("group", "reward"))


def test_newer_schema_is_refused():
    with pytest.raises(MarsError, match="newer than this mars reads"):
        records.validate({"schema_version": 99, "id": "a", "question": "q"}, "task")
    with pytest.raises(MarsError, match="positive integer"):
        records.validate({"schema_version": "1", "id": "a", "question": "q"}, "task")
