"""The DeepSpeed config and engine: gradients accumulate in fp32 under bf16."""

from __future__ import annotations

import json

import pytest
import torch

import helpers_train  # noqa: F401  (one DeepSpeed JIT cache for the session)
from mars_cli.rl.engine import load_ds_config


def test_packaged_configs_accumulate_in_fp32(tmp_path):
    for zero in (2, 3):
        assert load_ds_config(zero, None, bf16=True, grad_clip=1.0)["data_types"] == {"grad_accum_dtype": "fp32"}
    # No ZeRO under bf16 means stage 1 (DeepSpeed's fp32-accumulating bf16 optimizer); fp32 stays stage 0.
    assert load_ds_config(0, None, bf16=True, grad_clip=1.0)["zero_optimization"]["stage"] == 1
    assert "data_types" not in load_ds_config(0, None, bf16=False, grad_clip=1.0)
    # A user's own choice stands.
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "bf16"}}))
    assert load_ds_config(None, str(own), bf16=True, grad_clip=1.0)["data_types"]["grad_accum_dtype"] == "bf16"


@pytest.fixture(scope="module")
def small_policy_dir(tmp_path_factory):
    from mars_cli.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-8k", seed=0, vocab=8192)


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_bf16_engine_accumulates_micro_batches_in_fp32(small_policy_dir, zero):
    from mars_cli.models.load import load_policy
    from mars_cli.rl import batching
    from mars_cli.rl.engine import Trainer, freeze_vision

    policy = load_policy(small_policy_dir, dtype="bfloat16", trainable=True)
    freeze_vision(policy.model)
    trainer = Trainer(policy.model, zero=zero, bf16=True, lr=1e-3)
    assert trainer.engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert trainer.grad_accum_dtype == torch.float32
    ex = batching.Example([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 1, 1], [], 1.0)
    for last in (False, True):  # two micro-batches, summed before the step
        lp, mask, _ = batching.micro_logprobs(policy, [ex], model=trainer.model, grad=True)
        trainer.backward(-(lp * mask).sum(), last=last)
    head = trainer.model.get_output_embeddings().weight
    grad = trainer.full_grad(head)
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    assert trainer.step() > 0
