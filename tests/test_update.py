"""`mars update` on the tiny model, on a CPU, through DeepSpeed (gloo, one process)."""

from __future__ import annotations

import json

import pytest
import torch
import helpers_train as H


def _mean_logprobs(model_dir, batch_file):
    """Per trajectory, the mean log-prob of its policy tokens under the model at model_dir."""
    from mars_cli.jsonl import read_located
    from mars_cli.models.logprobs import token_logprobs
    from mars_cli.models.load import load_policy
    from mars_cli.rl.batching import update_examples

    pol = load_policy(model_dir)
    exs = update_examples(read_located([batch_file]), pol.special["image_pad"])
    lps = token_logprobs(pol, [(e.ids, e.images) for e in exs], masks=[e.mask for e in exs])
    return [float((lp * torch.tensor(e.mask)).sum() / sum(e.mask)) for lp, e in zip(lps, exs)]


def test_gspo_step_matches_closed_form_and_moves_the_policy(tiny_policy_dir, tmp_path):
    from mars_cli.models.logprobs import token_logprobs
    from mars_cli.models.load import load_policy
    from mars_cli.rl.update import UpdateConfig, run_update

    adv = [1.0, -1.0]
    batch = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", adv, image_dir=tmp_path)
    # Closed form at the start point: old = current, so s = 1 inside the clip range and
    # ∇loss = −(1/N) Σ_i A_i · mean_t ∇log π(y_it); loss = −(1/N) Σ_i A_i.
    ref_pol = load_policy(tiny_policy_dir, trainable=True)
    from mars_cli.rl.engine import freeze_vision

    freeze_vision(ref_pol.model)
    from mars_cli.jsonl import read_located
    from mars_cli.rl.batching import update_examples

    exs = update_examples(read_located([batch]), ref_pol.special["image_pad"])
    lps = token_logprobs(ref_pol, [(e.ids, e.images) for e in exs], grad=True, masks=[e.mask for e in exs])
    surrogate = sum(-a * (lp * torch.tensor(e.mask)).sum() / sum(e.mask) for a, lp, e in zip(adv, lps, exs)) / len(adv)
    surrogate.backward()
    names = ["model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.1.mlp.down_proj.weight",
             "model.language_model.norm.weight", "model.language_model.embed_tokens.weight"]
    want = {n: p.grad.clone() for n, p in ref_pol.model.named_parameters() if n in names}
    full_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref_pol.model.parameters() if p.grad is not None]))
    got = {}

    def hook(trainer, mb):
        params = dict(trainer.model.named_parameters())
        for n in names:
            got[n] = trainer.full_grad(params[n]).clone()

    before = {n: p.detach().clone() for n, p in ref_pol.model.named_parameters() if "visual" in n}
    out = tmp_path / "ck"
    cfg = UpdateConfig(policy=str(tiny_policy_dir), out=str(out), ref=str(tiny_policy_dir), beta=0.1, lr=1e-3,
                       micro_batch_tokens=1, zero=2)  # budget 1: each trajectory is its own micro-batch
    m = run_update([str(batch)], cfg, trainer_hook=hook)

    assert m["loss"] == pytest.approx(-sum(adv) / len(adv), abs=1e-6)
    for n in names:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7), n
    assert m["grad_norm"] == pytest.approx(float(full_norm), rel=1e-4)
    assert m["ratio_mean"] == pytest.approx(1.0) and m["clip_fraction"] == 0.0
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # reference = policy
    assert m["trajectories"] == 2 and m["steps"] == 1 and m["policy_tokens"] == sum(sum(e.mask) for e in exs)
    # The rollout log-probs in the batch are −1.0: the gap is measured against the trainer's.
    assert m["logprob_gap"]["tokens"] == m["policy_tokens"] and m["logprob_gap"]["mean_abs"] > 5

    # The step: the positive-advantage trajectory gains log-probability, the other loses it.
    b0, a0 = _mean_logprobs(tiny_policy_dir, batch), _mean_logprobs(out, batch)
    assert a0[0] > b0[0] and a0[1] < b0[1]
    # Frozen vision tower (and merger) bit-identical; the language model changed.
    new = load_policy(out)
    params = dict(new.model.named_parameters())
    assert before and all(torch.equal(params[n], v) for n, v in before.items())
    assert not torch.equal(params[names[0]], dict(ref_pol.model.named_parameters())[names[0]])
    meta = json.loads((out / "mars_meta.json").read_text())
    assert meta["step"] == 1 and meta["parent_fingerprint"] == ref_pol.fingerprint and meta["flags"]["zero"] == 2
    assert meta["metrics"]["loss"] == m["loss"] and len(meta["batch_hash"]) == 16
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    assert new.fingerprint == m["fingerprint"] != ref_pol.fingerprint


def test_resume_from_state_equals_an_uninterrupted_run(tiny_policy_dir, tmp_path):
    """Two mini-batches in one process == one invocation + a second that resumes --state."""
    from mars_cli.jsonl import read_file, write_records
    from mars_cli.models.load import load_policy

    both = H.write_batch(tiny_policy_dir, tmp_path / "both.jsonl", [1.0, -0.5, 0.8, -1.2], logprobs=-11.9)
    recs = read_file(both)
    write_records(recs[:2], tmp_path / "a.jsonl")
    write_records(recs[2:], tmp_path / "b.jsonl")
    common = ["--loss", "grpo", "--old-logprobs", "rollout", "--lr", "1e-3", "--beta", "0", "--micro-batch-tokens", "200",
              "--zero", "2"]
    r = H.Ran(["update", str(both), "--policy", str(tiny_policy_dir), "--out", str(tmp_path / "whole"),
                            "--batch-size", "2", *common])
    assert r.exit_code == 0, r.stderr
    whole = json.loads(r.stdout)
    assert whole["steps"] == 2 and whole["step"] == 2
    state = tmp_path / "state"
    r1 = H.Ran(["update", str(tmp_path / "a.jsonl"), "--policy", str(tiny_policy_dir),
                             "--out", str(tmp_path / "s1"), "--state", str(state), *common])
    assert r1.exit_code == 0, r1.stderr
    assert (state / "mars_state.json").is_file()
    # A state paired with another checkpoint is refused.
    bad = H.Ran(["update", str(tmp_path / "b.jsonl"), "--policy", str(tiny_policy_dir),
                              "--out", str(tmp_path / "x"), "--state", str(state), *common])
    assert bad.exit_code == 1 and "optimizer state belongs to checkpoint" in bad.stderr
    assert not (tmp_path / "x").exists()
    r2 = H.Ran(["update", str(tmp_path / "b.jsonl"), "--policy", str(tmp_path / "s1"),
                             "--out", str(tmp_path / "s2"), "--state", str(state), *common])
    assert r2.exit_code == 0, r2.stderr
    assert json.loads(r2.stdout)["step"] == 2
    a = dict(load_policy(tmp_path / "whole").model.named_parameters())
    b = dict(load_policy(tmp_path / "s2").model.named_parameters())
    s1 = dict(load_policy(tmp_path / "s1").model.named_parameters())
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(s1[name], a[name])  # the second step did something
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=0, atol=1e-6), n


def test_update_refuses_records_without_token_ids(tiny_policy_dir, tmp_path):
    batch = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", [1.0, 0.5], with_tokens=False)
    r = H.Ran(["update", str(batch), "--policy", str(tiny_policy_dir), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.stdout == ""
    assert f"mars update: {batch}:1: trajectory has no token ids" in r.stderr
    assert not (tmp_path / "o").exists()
    r = H.Ran(["update", str(batch), "--policy", str(tiny_policy_dir), "--out", str(tmp_path / "o"),
                            "--loss", "ppo"])
    assert r.exit_code == 2 and "--loss must be one of gspo, grpo" in r.stderr
    r = H.Ran(["update", batch, "--policy", tiny_policy_dir, "--out", tiny_policy_dir])
    assert r.exit_code == 2 and "--out must differ from --policy" in r.stderr


def test_non_finite_loss_stops_and_writes_nothing(tiny_policy_dir, tmp_path):
    # 1e300 is a valid JSON number but overflows float32: the loss becomes infinite.
    batch = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", [1e300, 0.5])
    state = tmp_path / "state"
    r = H.Ran(["update", batch, "--policy", tiny_policy_dir, "--out", tmp_path / "o", "--state", state])
    assert r.exit_code == 1 and r.stdout == ""
    assert "non-finite loss" in r.stderr and "nothing written" in r.stderr
    assert not (tmp_path / "o").exists() and not state.exists()


def test_minibatches_checkpointing_and_vision_training(tiny_policy_dir, tmp_path):
    """--batch-size 1: old log-probs come from the policy before the first step, so later
    steps see ratios ≠ 1; --train-vision moves the vision tower; --deepspeed takes a file."""
    from mars_cli.models.load import load_policy
    from mars_cli.rl.engine import CONFIG_DIR

    batch = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", [1.0, -1.0, 1.0], image_dir=tmp_path)
    out = tmp_path / "o"
    r = H.Ran(["update", batch, "--policy", tiny_policy_dir, "--out", out, "--batch-size", "1", "--lr", "1e-3",
               "--gradient-checkpointing", "--train-vision", "--deepspeed", CONFIG_DIR / "zero2.json", "--beta", "0",
               "--eps-low", "0.5", "--eps-high", "0.5"])
    assert r.exit_code == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["steps"] == 3 and m["ratio_max"] - m["ratio_min"] > 1e-3 and m["clip_fraction"] == 0.0
    assert m["logprob_gap"]["tokens"] == m["policy_tokens"]
    old = dict(load_policy(tiny_policy_dir).model.named_parameters())
    new = dict(load_policy(out).model.named_parameters())
    changed = [n for n in new if "visual" in n and not torch.equal(new[n], old[n])]
    assert changed
    flags = json.loads((out / "mars_meta.json").read_text())["flags"]
    assert flags["train_vision"] and flags["gradient_checkpointing"] and flags["deepspeed"].endswith("zero2.json")


def test_grpo_verl_weighs_each_micro_batch_as_verl_does(tiny_policy_dir, tmp_path):
    """verl's token-mean per micro-batch (dp_actor.py: loss_scale_factor = micro / mini-batch
    size): with the whole mini-batch in one micro-batch it is grpo's token mean; split into
    micro-batches of unequal token counts it differs."""
    batch = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", [1.0, -0.5, 0.8, -1.2])
    losses = {}
    for loss in ("grpo", "grpo-verl"):
        for tokens in ("100000", "60"):
            r = H.Ran(["update", str(batch), "--policy", str(tiny_policy_dir), "--out", str(tmp_path / f"{loss}-{tokens}"),
                       "--loss", loss, "--lr", "1e-9", "--beta", "0", "--micro-batch-tokens", tokens])
            assert r.exit_code == 0, r.stderr
            losses[loss, tokens] = json.loads(r.stdout)["loss"]
    assert losses["grpo-verl", "100000"] == pytest.approx(losses["grpo", "100000"], abs=1e-6)
    assert losses["grpo", "60"] == pytest.approx(losses["grpo", "100000"], abs=1e-6)  # mars: packing never matters
    assert losses["grpo-verl", "60"] != pytest.approx(losses["grpo-verl", "100000"], abs=1e-6)
