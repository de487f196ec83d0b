"""update/sft rebuild each image with the pixel limits its rollout recorded (policy.pixels)."""

from __future__ import annotations

import json

import pytest

import helpers_train as H


@pytest.fixture(scope="module")
def small_policy_dir(tmp_path_factory):
    from mars_cli.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-8k", seed=0, vocab=8192))


SMALL = {"min": 28 * 28 * 4, "max": 28 * 28 * 16}  # the tiny model's own: 56*56 .. 28*28*256


def _records(policy_dir, tmp_path):
    """Two one-image trajectories of a 4K-ish photo: the first records SMALL limits, the second none."""
    path = H.write_batch(policy_dir, tmp_path / "b.jsonl", [1.0, -1.0], image_dir=tmp_path)
    for i in range(2):
        H.make_image(tmp_path / f"img{i}.png", color=(60 * i, 90, 160), size=(1920, 1080))
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[0]["policy"] = {"path": policy_dir, "engine": "hf", "pixels": dict(SMALL)}
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_recorded_limits_give_the_rollouts_patch_count(small_policy_dir, tmp_path):
    from mars_cli.jsonl import read_located
    from mars_cli.models.inputs import build_inputs, image_tokens
    from mars_cli.models.load import load_policy
    from mars_cli.rl import batching

    path = _records(small_policy_dir, tmp_path)
    policy = load_policy(small_policy_dir)  # the trainer's: the checkpoint's own limits
    rollout_small = load_policy(small_policy_dir, min_pixels=SMALL["min"], max_pixels=SMALL["max"])
    exs = batching.update_examples(read_located([str(path)]), policy.special["image_pad"])
    assert exs[0].pixels == (SMALL["min"], SMALL["max"]) and exs[1].pixels is None
    small = image_tokens(rollout_small, exs[0].images[0])  # what the rollout expanded it to
    default = image_tokens(policy, exs[1].images[0])
    assert small < default  # the limits matter for this image
    assert batching.expanded_length(policy, exs[0]) == len(exs[0].ids) - 1 + small
    assert batching.expanded_length(policy, exs[1]) == len(exs[1].ids) - 1 + default
    batch = build_inputs(policy, [(e.ids, e.images) for e in exs], pixels=[e.pixels for e in exs])
    pads = (batch.tensors["input_ids"] == policy.special["image_pad"]).sum(1).tolist()
    assert pads == [small, default] and batch.lengths == [batching.expanded_length(policy, e) for e in exs]
    # --max-pixels on update/sft (the trainer policy's limits) changes only records without their own.
    capped = load_policy(small_policy_dir, max_pixels=28 * 28 * 64)
    assert batching.expanded_length(capped, exs[0]) == len(exs[0].ids) - 1 + small
    assert batching.expanded_length(capped, exs[1]) == len(exs[1].ids) - 1 + image_tokens(capped, exs[1].images[0])
    assert image_tokens(capped, exs[1].images[0]) < default


def test_bad_recorded_limits_name_the_line(small_policy_dir, tmp_path):
    path = _records(small_policy_dir, tmp_path)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[1]["policy"] = {"pixels": {"min": 500, "max": 100}}
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ran = H.Ran(["update", path, "--policy", small_policy_dir, "--out", tmp_path / "o"])
    assert ran.exit_code == 1 and f"{path}:2: policy.pixels" in ran.stderr


def test_update_and_sft_train_with_recorded_limits(small_policy_dir, tmp_path):
    path = _records(small_policy_dir, tmp_path)
    common = ["--policy", small_policy_dir, "--max-pixels", str(28 * 28 * 64)]
    up = H.Ran(["update", path, "--out", tmp_path / "u", "--beta", "0", *common])
    assert up.exit_code == 0, up.stderr
    sft = H.Ran(["sft", path, "--out", tmp_path / "s", "--no-eval", *common])
    assert sft.exit_code == 0, sft.stderr
    assert json.loads((tmp_path / "u" / "mars_meta.json").read_text())["flags"]["max_pixels"] == 28 * 28 * 64
