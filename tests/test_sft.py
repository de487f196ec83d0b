"""`mars sft`: assistant-only NLL, warmup + cosine, NLL goes down, ZeRO-3 checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

import helpers_train as H
from mars_cli import protocol


def test_teacher_records_are_rendered_with_only_assistant_tokens_trained(tiny_policy_dir, tmp_path):
    from mars_cli.jsonl import read_located, write_records
    from mars_cli.models.load import load_tokenizer, special_ids
    from mars_cli.rl.batching import sft_examples

    tok = load_tokenizer(tiny_policy_dir)
    sp = special_ids(tok)
    renderer = protocol.Renderer(tok, sp)
    img = H.make_image(tmp_path / "a.png")
    rec = H.trajectory(renderer, "t0", "What is it?", "a cat", [img], with_tokens=False)
    call = protocol.format_assistant("Zoom first.", call=(protocol.ZOOM, {"bbox_2d": [0, 0, 500, 500]}))
    rec["messages"][2:2] = [{"role": "assistant", "content": call},
                            protocol.tool_message(protocol.ZOOM, protocol.ZOOM_HEADER, [img])]
    low = dict(rec, reward=0.0)
    write_records([rec, low], tmp_path / "t.jsonl")
    [ex] = sft_examples(read_located([tmp_path / "t.jsonl"]), renderer, sp["image_pad"], min_reward=0.5)
    trained = tok.decode([t for t, m in zip(ex.ids, ex.mask) if m])
    assert trained == call + "<|im_end|>" + rec["messages"][-1]["content"] + "<|im_end|>"
    assert len(ex.images) == 2 and sum(1 for t in ex.ids if t == sp["image_pad"]) == 2


@pytest.mark.parametrize("change, message", [
    (lambda m: m[-1].update(role="bogus"), "messages[2]: role must be one of system, user, assistant, tool, got 'bogus'"),
    (lambda m: m[-1].update(content=None), 'messages[2]: content is null (an empty turn is "")'),
    (lambda m: m[1]["content"].append({"type": "video", "video": "v.mp4"}),
     "messages[1]: a content part of type 'video' cannot be rendered (only text and image parts)"),
    (lambda m: m[1]["content"].append({"type": "image_url", "image_url": {"url": "x"}}), "type 'image_url' cannot be rendered"),
    (lambda m: m[1]["content"].append({"type": "text", "text": 7}), "a text part needs a string 'text' field")])
def test_minor_sft_refuses_messages_it_cannot_render(tiny_policy_dir, tmp_path, change, message):
    """role "bogus", content null and video parts were silently trained on (or dropped)."""
    from mars_cli.errors import MarsError
    from mars_cli.jsonl import read_located, write_records
    from mars_cli.models.load import load_tokenizer, special_ids
    from mars_cli.rl.batching import sft_examples

    tok = load_tokenizer(tiny_policy_dir)
    sp = special_ids(tok)
    renderer = protocol.Renderer(tok, sp)
    good = H.trajectory(renderer, "t0", "What is it?", "a cat", [], with_tokens=False)
    bad = H.trajectory(renderer, "t1", "What is it?", "a dog", [], with_tokens=False)
    if isinstance(bad["messages"][1]["content"], str):
        bad["messages"][1]["content"] = [{"type": "text", "text": bad["messages"][1]["content"]}]
    change(bad["messages"])
    write_records([good, bad], tmp_path / "t.jsonl")
    with pytest.raises(MarsError) as e:
        sft_examples(read_located([tmp_path / "t.jsonl"]), renderer, sp["image_pad"])
    assert str(e.value).startswith(f"{tmp_path / 't.jsonl'}:2: ") and message in str(e.value)


def test_minor_sft_skips_a_trajectory_over_max_seq_len(tiny_policy_dir, tmp_path):
    """A runaway assistant message is skipped with a warning naming its line, not trained for minutes."""
    from mars_cli.jsonl import write_records
    from mars_cli.models.load import load_policy, load_tokenizer, special_ids
    from mars_cli.models.load import context_length

    tok = load_tokenizer(tiny_policy_dir)
    renderer = protocol.Renderer(tok, special_ids(tok))
    recs = [H.trajectory(renderer, f"t{i}", "What is it?", "a cat", [], with_tokens=False) for i in range(3)]
    recs[1]["messages"][-1]["content"] = "word " * 5000
    write_records(recs, tmp_path / "t.jsonl")
    r = H.Ran(["sft", tmp_path / "t.jsonl", "--policy", tiny_policy_dir, "--out", tmp_path / "sft", "--max-seq-len", "1000",
               "--batch-size", "2", "--no-eval"])
    assert r.exit_code == 0, r.stderr
    assert f"{tmp_path / 't.jsonl'}:2: skipped: " in r.stderr and "tokens, over --max-seq-len 1,000" in r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["steps"] == 1  # two trajectories left, one step of 2
    r = H.Ran(["sft", tmp_path / "t.jsonl", "--policy", tiny_policy_dir, "--out", tmp_path / "sft2", "--max-seq-len", "10"])
    assert r.exit_code == 1 and "no trajectories within --max-seq-len 10 tokens" in r.stderr
    assert not (tmp_path / "sft2").exists()
    assert context_length(load_policy(tiny_policy_dir).model) == 32768  # the default bound


def test_lr_schedule_warms_up_then_decays():
    from mars_cli.rl.sft import lr_factor

    f = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a > b for a, b in zip(f[2:], f[3:]))
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_sft_lowers_nll_on_its_data(tiny_policy_dir, tmp_path):
    from mars_cli.models.load import load_policy

    teacher = H.write_batch(tiny_policy_dir, tmp_path / "teacher.jsonl", [0.0] * 4, image_dir=tmp_path, with_tokens=False)
    out = tmp_path / "sft"
    r = H.Ran(["sft", teacher, "--policy", tiny_policy_dir, "--out", out, "--epochs", "2", "--lr", "3e-3",
               "--batch-size", "2", "--warmup", "0.25", "--micro-batch-tokens", "300"])
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["epoch"] for x in recs] == [1, 2] and recs[-1]["steps"] == 4
    for x in recs:
        assert x["nll_after"] < x["nll_before"]
    assert recs[1]["nll_before"] == recs[0]["nll_after"]
    assert recs[-1]["nll_after"] < recs[0]["nll_before"] - 0.3
    assert recs[-1]["out"] == str(out) and recs[-1]["fingerprint"] == load_policy(out).fingerprint
    meta = json.loads((out / "mars_meta.json").read_text())
    assert meta["kind"] == "sft" and meta["step"] == 4 and meta["flags"]["warmup_steps"] == 1


@pytest.mark.slow
def test_sft_zero3_max_steps_writes_a_full_checkpoint(tiny_qwen3_dir, tmp_path):
    from mars_cli.models.load import load_policy

    teacher = H.write_batch(tiny_qwen3_dir, tmp_path / "teacher.jsonl", [0.0] * 3, image_dir=tmp_path, with_tokens=False)
    out = tmp_path / "sft3"
    r = H.Ran(["sft", teacher, "--policy", tiny_qwen3_dir, "--out", out, "--zero", "3", "--max-steps", "1",
               "--batch-size", "2", "--lr", "1e-3", "--no-eval"])
    assert r.exit_code == 0, r.stderr
    [rec] = [json.loads(x) for x in r.stdout.splitlines()]
    assert rec["steps"] == 1 and rec["nll_before"] is None and rec["grad_norm"] > 0
    old = dict(load_policy(tiny_qwen3_dir).model.named_parameters())
    new = dict(load_policy(out).model.named_parameters())
    assert old.keys() == new.keys()
    for n, p in new.items():
        assert p.shape == old[n].shape and torch.isfinite(p).all(), n
        if "visual" in n:
            assert torch.equal(p, old[n]), n
    assert not torch.equal(new["model.language_model.layers.0.mlp.up_proj.weight"],
                           old["model.language_model.layers.0.mlp.up_proj.weight"])
