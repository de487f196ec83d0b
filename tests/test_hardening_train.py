"""Regressions of the hardening pass, training inputs: empty trajectories, foreign token ids, duplicates."""

from __future__ import annotations

import json

import pytest

import helpers_train as H
from mars_cli.errors import MarsError, RecordError
from mars_cli.jsonl import read_located


def _batch(tiny_policy_dir, tmp_path, n=3):
    path = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", [1.0, -1.0, 0.5][:n])
    return path, [json.loads(x) for x in path.read_text().splitlines()]


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_c1_trajectory_without_policy_tokens_is_skipped_and_the_step_goes_on(tiny_policy_dir, tmp_path):
    path, recs = _batch(tiny_policy_dir, tmp_path)
    recs[1]["tokens"]["mask"] = [0] * len(recs[1]["tokens"]["mask"])  # the prompt filled the whole budget
    recs[1]["finish"] = "max_tokens"
    _write(path, recs)
    r = H.Ran(["update", path, "--policy", tiny_policy_dir, "--out", tmp_path / "o", "--lr", "1e-4"])
    assert r.exit_code == 0, r.stderr
    assert f"{path}:2: skipped: the trajectory has no policy tokens" in r.stderr
    assert json.loads(r.stdout)["trajectories"] == 2 and (tmp_path / "o" / "config.json").is_file()


def test_c1_a_batch_of_only_empty_trajectories_is_a_clear_error(tiny_policy_dir, tmp_path):
    from mars_cli.rl.batching import update_examples

    _, recs = _batch(tiny_policy_dir, tmp_path, n=1)
    recs[0]["tokens"]["mask"] = [0] * len(recs[0]["tokens"]["mask"])
    with pytest.raises(MarsError, match=r"no trajectories in the batch with policy tokens \(1 without\)"):
        update_examples(read_located([_write(tmp_path / "e.jsonl", recs)]), image_pad=151655)


def test_c7_token_id_beyond_the_vocabulary_is_an_error_before_any_step(tiny_policy_dir, tmp_path):
    path, recs = _batch(tiny_policy_dir, tmp_path)
    recs[2]["tokens"]["ids"][5] = 10_000_000
    _write(path, recs)
    for cmd in ("update", "sft"):
        r = H.Ran([cmd, path, "--policy", tiny_policy_dir, "--out", tmp_path / cmd])
        assert r.exit_code == 1 and f"{path}:3: tokens.ids holds token 10000000 (at position 5), beyond" in r.stderr
        assert not (tmp_path / cmd).exists()


def test_w5_empty_token_ids_name_file_and_line(tiny_policy_dir, tmp_path):
    from mars_cli.rl.batching import update_examples

    _, recs = _batch(tiny_policy_dir, tmp_path, n=1)
    recs[0]["tokens"].update(ids=[], mask=[], logprobs=[], images=[])
    with pytest.raises(RecordError, match=r"e.jsonl:1: tokens.ids is empty"):
        update_examples(read_located([_write(tmp_path / "e.jsonl", recs)]), image_pad=151655)


def test_w2_duplicate_trajectories_are_refused_by_update_and_advantage(tiny_policy_dir, tmp_path):
    from mars_cli.rl.batching import update_examples

    path, recs = _batch(tiny_policy_dir, tmp_path, n=2)
    with pytest.raises(RecordError, match=r"b.jsonl:1: duplicate trajectory: group 't0' sample 0 was already read at .*b.jsonl:1"):
        update_examples(read_located([path, path]), image_pad=151655)
    r = H.Ran(["advantage", path, path])
    assert r.exit_code == 1 and "duplicate trajectory: group 't0' sample 0" in r.stderr


def test_w2_rollout_warns_on_duplicate_task_ids(tmp_path, capsys):
    from mars_cli.records import warn_duplicate_tasks

    f = _write(tmp_path / "t.jsonl", [{"id": "a", "question": "q"}, {"id": "b", "question": "q"}, {"id": "a", "question": "r"}])
    assert [r["id"] for _, r in warn_duplicate_tasks(read_located([f]))] == ["a", "b", "a"]
    err = capsys.readouterr().err
    assert f"{f}:3: task id 'a' was already read at {f}:1" in err and err.count("\n") == 1
