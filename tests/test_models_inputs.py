"""Placeholder expansion, batching and per-token log-probs on the tiny checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mars_cli import protocol
from mars_cli.errors import MarsError
from mars_cli.models import inputs, vocab
from mars_cli.models.inputs import build_inputs, image_tokens
from mars_cli.models.logprobs import token_logprobs
from mars_cli.models.load import load_policy


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def policy(request, tiny_policy_dir, tiny_qwen3_dir):
    path = tiny_policy_dir if request.param == "qwen2.5-vl" else tiny_qwen3_dir
    return load_policy(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Files of different sizes and shapes (a 4K photo, a tall strip, a small PNG)."""
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for name, size, seed in [("big.jpg", (3840, 2160), 1), ("tall.png", (60, 700), 2), ("small.png", (300, 200), 3)]:
        g = torch.Generator().manual_seed(seed)
        arr = torch.randint(0, 256, (size[1] // 20 + 1, size[0] // 20 + 1, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(arr.numpy()).resize(size, Image.Resampling.BILINEAR).save(d / name)
        paths.append(str(d / name))
    return paths


def _messages(paths, question="What is in the picture?"):
    content = [{"type": "image", "image": p} for p in paths] + [{"type": "text", "text": question}]
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": content}]


def _reference_ids(policy, messages, paths):
    """The official processor's way: template text, each <|image_pad|> → N pads, tokenize."""
    proc = policy.image_processor
    text = policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(paths) + 1
    out = pieces[0]
    for p, rest in zip(paths, pieces[1:]):
        grid = proc(images=[Image.open(p).convert("RGB")], return_tensors="pt")["image_grid_thw"][0]
        out += "<|image_pad|>" * int(grid.prod() // proc.merge_size ** 2) + rest
    return policy.tokenizer(out, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("which", [[2], [0, 1, 2], [1, 1]])
def test_expansion_equals_processor_expansion(policy, images, which):
    paths = [images[i] for i in which]
    msgs = _messages(paths)
    ids, _mask, imgs = protocol.render(msgs, policy.tokenizer, policy.special)
    assert imgs == paths and ids.count(policy.special["image_pad"]) == len(paths)
    batch = build_inputs(policy, [(ids, paths)])
    expanded = batch.tensors["input_ids"][0].tolist()
    assert expanded == _reference_ids(policy, msgs, paths)
    # positions map every stored id to the same id in the expanded sequence
    assert [expanded[p] for p in batch.positions[0].tolist()] == ids
    n_pad = sum(image_tokens(policy, p) for p in paths)
    assert batch.tensors["mm_token_type_ids"][0].sum().item() == n_pad
    assert len(expanded) == len(ids) - len(paths) + n_pad
    # pixel values: the processor's, image by image, concatenated
    ref = [policy.image_processor(images=[Image.open(p).convert("RGB")], return_tensors="pt") for p in paths]
    assert torch.equal(batch.tensors["pixel_values"], torch.cat([r["pixel_values"] for r in ref]))
    assert torch.equal(batch.tensors["image_grid_thw"], torch.cat([r["image_grid_thw"] for r in ref]))


def test_a_4k_photo_is_a_modest_number_of_tokens(policy, images):
    assert 100 < image_tokens(policy, images[0]) <= 256
    pil = Image.open(images[1])
    assert image_tokens(policy, pil) == image_tokens(policy, images[1])


def test_padding_sides_and_masks(policy, images):
    a = protocol.render(_messages([images[2]]), policy.tokenizer, policy.special)[0]
    b = protocol.render([{"role": "user", "content": "hi"}], policy.tokenizer, policy.special)[0]
    for side in ("left", "right"):
        batch = build_inputs(policy, [(a, [images[2]]), (b, [])], pad_side=side)
        t = batch.tensors
        short = t["attention_mask"][1]
        assert short.sum().item() == len(b) and batch.lengths[1] == len(b)
        real = short.nonzero().flatten()
        assert (real[0].item() == 0) == (side == "right") and real[-1].item() - real[0].item() == len(b) - 1
        assert t["input_ids"][1][real].tolist() == b
        assert t["input_ids"][1][short == 0].eq(policy.special["pad"]).all()
        assert t["mm_token_type_ids"][1].sum().item() == 0
        assert [t["input_ids"][1][p].item() for p in batch.positions[1]] == b


def test_placeholder_count_must_match_images(policy, images):
    ids = protocol.render(_messages([images[2]]), policy.tokenizer, policy.special)[0]
    with pytest.raises(MarsError, match="1 image placeholder but 2 images"):
        build_inputs(policy, [(ids, [images[2], images[1]])])
    with pytest.raises(MarsError, match="sequence 1: 0 image placeholders but 1 image"):
        build_inputs(policy, [(ids, [images[2]]), ([1, 2, 3], [images[2]])])
    with pytest.raises(MarsError, match="pad_side"):
        build_inputs(policy, [(ids, [images[2]])], pad_side="middle")


def _full_logprob_reference(policy, ids, imgs):
    batch = build_inputs(policy, [(ids, imgs)])
    with torch.no_grad():
        logits = policy.model(**batch.tensors).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    pos = batch.positions[0]
    return torch.tensor([0.0] + [logp[pos[i] - 1, ids[i]].item() for i in range(1, len(ids))])


def _conversation(policy, images):
    msgs = _messages([images[2], images[1]]) + [{"role": "assistant", "content": "A red square and a strip."}]
    return protocol.render(msgs, policy.tokenizer, policy.special, add_generation_prompt=False)


def test_token_logprobs_match_a_full_vocab_log_softmax(policy, images):
    ids, mask, imgs = _conversation(policy, images)
    got = token_logprobs(policy, [(ids, imgs)])[0]
    assert got.shape == (len(ids),) and got[0].item() == 0.0 and got.dtype == torch.float32
    assert torch.allclose(got, _full_logprob_reference(policy, ids, imgs), atol=1e-5)
    assert (got[1:] < 0).all()
    # masked: the same values where mask is 1, zero elsewhere
    only = token_logprobs(policy, [(ids, imgs)], masks=[mask])[0]
    m = torch.tensor(mask, dtype=torch.bool)
    m[0] = False
    assert m.sum() > 3 and torch.allclose(only[m], got[m], atol=1e-6) and (only[~m] == 0).all()


def test_batched_equals_unbatched_both_padding_sides(policy, images):
    conv = _conversation(policy, images)
    text_only = protocol.render([{"role": "user", "content": "Name a colour."}], policy.tokenizer, policy.special)
    one = protocol.render(_messages([images[1]], "Where?"), policy.tokenizer, policy.special)
    seqs = [(conv[0], conv[2]), (text_only[0], []), (one[0], one[2])]
    alone = [token_logprobs(policy, [s])[0] for s in seqs]
    for side in ("right", "left"):
        together = token_logprobs(policy, seqs, pad_side=side)
        for a, b in zip(together, alone):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), side


def test_the_image_reaches_the_model(policy, images):
    ids, _mask, imgs = _conversation(policy, images)
    base = token_logprobs(policy, [(ids, imgs)])[0]
    swapped = token_logprobs(policy, [(ids, [images[0], imgs[1]])])[0]
    first_pad = ids.index(policy.special["image_pad"])
    assert torch.equal(base[:first_pad + 1], swapped[:first_pad + 1])  # before the image: same
    assert (base[first_pad + 2:] - swapped[first_pad + 2:]).abs().max() > 1e-4  # after it: not


def test_vision_filler_runs_the_tower_and_leaves_log_probs_unchanged(policy):
    """A rank without images runs the vision tower on a blank image after the shortest row."""
    short = protocol.render([{"role": "user", "content": "Name a colour."}], policy.tokenizer, policy.special)[0]
    long = protocol.render([{"role": "user", "content": "Name three colours and a shape."}], policy.tokenizer,
                           policy.special)[0]
    seqs = [(long, []), (short, [])]
    plain = build_inputs(policy, seqs)
    filled = build_inputs(policy, seqs, vision_filler=True)
    assert "pixel_values" not in plain.tensors and filled.tensors["pixel_values"].shape[0] > 0
    k = int(filled.tensors["image_grid_thw"].prod()) // policy.image_processor.merge_size ** 2
    pads = (filled.tensors["input_ids"][1] == policy.special["image_pad"]).nonzero().squeeze(1)
    assert pads.tolist() == list(range(len(short), len(short) + k))  # after the short row's last token
    assert filled.lengths == plain.lengths and int(filled.tensors["mm_token_type_ids"].sum()) == k
    calls = []
    hook = policy.model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        a = token_logprobs(policy, seqs, batch=plain)
        b = token_logprobs(policy, seqs, batch=filled)
    finally:
        hook.remove()
    assert calls == [1]
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-6)


def test_grad_path_matches_and_backpropagates(tiny_policy_dir, images, monkeypatch):
    policy = load_policy(tiny_policy_dir, trainable=True)
    assert policy.model.training
    conv = _conversation(policy, images)
    seqs = [(conv[0], conv[2])]
    monkeypatch.setattr(vocab, "LOGIT_CHUNK", 7)  # several chunks, recomputed in backward
    with_grad = token_logprobs(policy, seqs, grad=True, masks=[conv[1]])[0]
    assert with_grad.requires_grad
    with_grad.sum().backward()
    head = policy.model.lm_head.weight.grad
    assert head is not None and head.abs().sum() > 0
    policy.model.eval()
    no_grad = token_logprobs(policy, seqs, masks=[conv[1]])[0]
    assert not no_grad.requires_grad and torch.allclose(with_grad.detach(), no_grad, atol=1e-5)


def test_model_override_unwraps_a_wrapper(policy, images):
    class Engine(torch.nn.Module):  # what DeepSpeed's engine looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    ids, _mask, imgs = _conversation(policy, images)
    a = token_logprobs(policy, [(ids, imgs)])[0]
    b = token_logprobs(policy, [(ids, imgs)], model=Engine(policy.model))[0]
    assert torch.equal(a, b)


def test_generate_logits_agree_with_token_logprobs(policy, images):
    prompts = [protocol.render(_messages([images[2]]), policy.tokenizer, policy.special),
               protocol.render(_messages([images[1], images[2]], "Compare the two."), policy.tokenizer, policy.special)]
    seqs = [(p[0], p[2]) for p in prompts]
    batch = build_inputs(policy, seqs, pad_side="left")
    torch.manual_seed(0)
    with torch.inference_mode():
        gen = policy.model.generate(**batch.tensors, max_new_tokens=6, do_sample=True, temperature=1.0, top_k=0,
                                    top_p=1.0, output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=policy.special["pad"])
    width = batch.tensors["input_ids"].shape[1]
    logits = torch.stack(gen.logits).float()  # (steps, batch, vocab)
    for b, (ids, imgs) in enumerate(seqs):
        new = gen.sequences[b, width:].tolist()
        eos = policy.special["eos"]
        new = new[: new.index(eos) + 1] if eos in new else new
        assert new
        sampled = torch.log_softmax(logits[: len(new), b], -1).gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        full = token_logprobs(policy, [(ids + new, imgs)])[0][len(ids):]
        assert torch.allclose(sampled, full, atol=1e-4), (sampled, full)


def test_processed_images_are_cached_by_file_identity(tiny_policy_dir, tmp_path, monkeypatch):
    policy = load_policy(tiny_policy_dir)
    calls = []
    real = inputs._process_one
    monkeypatch.setattr(inputs, "_process_one", lambda proc, pil: calls.append(pil.size) or real(proc, pil))
    inputs._pixels.clear()
    path = tmp_path / "a.png"
    Image.new("RGB", (200, 100), (255, 0, 0)).save(path)
    ids = protocol.render(_messages([str(path)]), policy.tokenizer, policy.special)[0]
    first = build_inputs(policy, [(ids, [str(path)]), (ids, [str(path)])])
    assert len(calls) == 1  # one file, two sequences: processed once
    again = build_inputs(policy, [(ids, [str(path)])])
    assert len(calls) == 1 and torch.equal(again.tensors["pixel_values"], first.tensors["pixel_values"][:len(again.tensors["pixel_values"])])
    Image.new("RGB", (200, 100), (0, 0, 255)).save(path)
    os.utime(path, ns=(1, 2))  # a rewritten file, even within the same mtime tick, has a new identity
    changed = build_inputs(policy, [(ids, [str(path)])])
    assert len(calls) == 2 and not torch.equal(changed.tensors["pixel_values"], again.tensors["pixel_values"])
    monkeypatch.setenv("MARS_PIXEL_CACHE_MB", "0")  # a budget of 0 keeps nothing
    inputs._pixels.clear()
    build_inputs(policy, [(ids, [str(path)])])
    build_inputs(policy, [(ids, [str(path)])])
    assert len(calls) == 4
    with pytest.raises(MarsError, match="missing.png"):
        build_inputs(policy, [(ids, [str(tmp_path / "missing.png")])])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.one_of(st.integers(0, 151642), st.just(-1)), min_size=1, max_size=30),
                min_size=1, max_size=4),
       st.sampled_from(["left", "right"]))
def test_positions_map_every_stored_id_property(rows, side):
    """Any ids with any number of images: expanded[pos[i]] == ids[i], pads expand to the patch count."""
    from types import SimpleNamespace

    proc = _processor()
    pad = 151655
    sizes = [(56, 56), (120, 40), (30, 200)]
    seqs = []
    for r in rows:
        ids = [pad if t == -1 else t for t in r]
        seqs.append((ids, [Image.new("RGB", sizes[i % 3]) for i in range(ids.count(pad))]))
    policy = SimpleNamespace(special={"pad": 151643, "image_pad": pad}, image_processor=proc)
    batch = build_inputs(policy, seqs, pad_side=side)
    t = batch.tensors
    for b, (ids, imgs) in enumerate(seqs):
        row = t["input_ids"][b]
        assert [row[p].item() for p in batch.positions[b]] == ids
        n_img = sum(proc.get_number_of_image_patches(h, w, {}) // 4 for (w, h) in (im.size for im in imgs))
        assert batch.lengths[b] == len(ids) - len(imgs) + n_img == t["attention_mask"][b].sum().item()
        assert t["mm_token_type_ids"][b].sum().item() == n_img


_PROC = []


def _processor():
    """The tiny qwen2.5-vl image processor settings, without building a model."""
    if not _PROC:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        _PROC.append(Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}))
    return _PROC[0]
