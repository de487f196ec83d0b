"""--attn-implementation on update, sft and the hf engine (rollout, ask)."""

from __future__ import annotations

import importlib.util
import json

import pytest

import helpers_train as H


@pytest.fixture(scope="module")
def small_policy_dir(tmp_path_factory):
    from mars_cli.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-8k", seed=0, vocab=8192))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
@pytest.mark.parametrize("command", ["update", "sft", "rollout", "ask"])
def test_flash_attention_2_without_its_package_is_a_clear_error(small_policy_dir, tmp_path, command):
    batch = H.write_batch(small_policy_dir, tmp_path / "b.jsonl", [1.0])
    args = {"update": ["update", batch, "--out", tmp_path / "o"], "sft": ["sft", batch, "--out", tmp_path / "o"],
            "rollout": ["rollout", batch], "ask": ["ask", H.make_image(tmp_path / "i.png"), "What is it?"]}[command]
    ran = H.Ran([*args, "--policy", small_policy_dir, "--attn-implementation", "flash_attention_2"])
    assert ran.exit_code == 1
    assert "flash_attention_2 needs the flash-attn package" in ran.stderr and "Traceback" not in ran.stderr
    assert not (tmp_path / "o").exists() and not ran.stdout.strip()


def test_unknown_attention_is_a_usage_error(small_policy_dir, tmp_path):
    batch = H.write_batch(small_policy_dir, tmp_path / "b.jsonl", [1.0])
    ran = H.Ran(["update", batch, "--policy", small_policy_dir, "--out", tmp_path / "o", "--attn-implementation", "flash"])
    assert ran.exit_code == 2 and "sdpa, flash_attention_2, eager" in ran.stderr


def test_eager_attention_takes_the_same_step_as_sdpa(small_policy_dir, tmp_path):
    batch = H.write_batch(small_policy_dir, tmp_path / "b.jsonl", [1.0, -1.0], image_dir=tmp_path)
    common = ["--policy", small_policy_dir, "--lr", "1e-3", "--beta", "0"]
    runs = {}
    for attn in ("sdpa", "eager"):
        ran = H.Ran(["update", batch, "--out", tmp_path / attn, "--attn-implementation", attn, *common])
        assert ran.exit_code == 0, ran.stderr
        runs[attn] = json.loads(ran.stdout)
        flags = json.loads((tmp_path / attn / "mars_meta.json").read_text())["flags"]
        assert flags["attn_implementation"] == attn
    assert runs["eager"]["grad_norm"] == pytest.approx(runs["sdpa"]["grad_norm"], rel=1e-4)
    assert runs["eager"]["loss"] == pytest.approx(runs["sdpa"]["loss"], rel=1e-6)


def test_hf_engine_loads_the_attention_asked_for(small_policy_dir):
    from mars_cli.engines import open_engine

    eng = open_engine("hf", policy=small_policy_dir, attn_implementation="eager")
    assert eng.policy.model.config._attn_implementation == "eager"
