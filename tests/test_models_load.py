"""Loading policy directories: the model, tokenizer, image processor, ids, fingerprint."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mars_cli.errors import MarsError
from mars_cli.models.load import fingerprint, load_image_processor, load_policy
from mars_cli.models.tiny import describe


def _linked_copy(src, dst, skip=()):
    """A model directory of symlinks to `src`'s files (cheap), minus `skip`."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in skip:
            (dst / p.name).symlink_to(p)
    return dst


@pytest.mark.parametrize("which", ["qwen2.5-vl", "qwen3-vl"])
def test_loads_both_archs_for_inference(which, tiny_policy_dir, tiny_qwen3_dir):
    path = tiny_policy_dir if which == "qwen2.5-vl" else tiny_qwen3_dir
    p = load_policy(path)
    assert p.arch == which and p.path == str(path)
    assert not p.model.training and not any(t.requires_grad for t in p.model.parameters())
    assert next(p.model.parameters()).dtype == torch.float32 and str(p.device) == "cpu"
    assert p.special == {"im_start": 151644, "im_end": 151645, "vision_start": 151652, "vision_end": 151653,
                         "image_pad": 151655, "eos": 151645, "pad": 151643}
    assert type(p.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert p.image_processor.patch_size == (14 if which == "qwen2.5-vl" else 16) and p.merge_size == 2
    assert p.fingerprint == describe(path)["fingerprint"] == fingerprint(path)
    assert len(p.fingerprint) == 16


def test_trainable_and_dtype(tiny_policy_dir):
    p = load_policy(tiny_policy_dir, trainable=True, dtype="bfloat16")
    assert p.model.training and next(p.model.parameters()).dtype == torch.bfloat16
    assert all(t.requires_grad for t in p.model.parameters())
    with pytest.raises(MarsError, match="unknown dtype"):
        load_policy(tiny_policy_dir, dtype="int3")


def test_fingerprint_follows_the_weights(tiny_policy_dir, tmp_path):
    copy = _linked_copy(tiny_policy_dir, tmp_path / "m", skip=("model.safetensors", "config.json"))
    (copy / "config.json").write_bytes((tiny_policy_dir / "config.json").read_bytes())
    weights = copy / "model.safetensors"
    weights.write_bytes((tiny_policy_dir / "model.safetensors").read_bytes())
    st = (tiny_policy_dir / "model.safetensors").stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(copy) == fingerprint(tiny_policy_dir)  # recorded content fingerprint still valid
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
    changed = fingerprint(copy)
    assert changed != fingerprint(tiny_policy_dir) and fingerprint(copy) == changed
    cfg = json.loads((copy / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(copy) != changed
    # An edited config alone (weights untouched) is another policy too.
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(copy) not in (fingerprint(tiny_policy_dir), changed)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such model directory"),
    ("file", "not a directory"),
    ("empty", r"not a model directory \(no config.json\)"),
    ("badjson", "invalid JSON"),
    ("llama", "unsupported model_type 'llama'.*qwen2_5_vl"),
    ("noweights", "no weights files"),
    ("notokenizer", "no tokenizer files"),
    ("nopreprocessor", "no preprocessor_config.json"),
])
def test_clear_errors_for_what_is_not_a_policy(case, message, tiny_policy_dir, tmp_path):
    path = tmp_path / "m"
    if case == "file":
        path.write_text("x")
    elif case == "empty":
        path.mkdir()
    elif case == "badjson":
        path.mkdir()
        (path / "config.json").write_text("{not json")
    elif case == "llama":
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "llama"}')
    elif case == "noweights":
        _linked_copy(tiny_policy_dir, path, skip=("model.safetensors",))
    elif case == "notokenizer":
        _linked_copy(tiny_policy_dir, path, skip=("tokenizer.json",))
    elif case == "nopreprocessor":
        _linked_copy(tiny_policy_dir, path, skip=("preprocessor_config.json",))
    with pytest.raises(MarsError, match=message):
        load_policy(path)


def _tokens(proc, h, w):
    return proc.get_number_of_image_patches(h, w, {}) // proc.merge_size ** 2


def test_release_style_image_processor_configs(tmp_path):
    # Qwen2.5-VL releases give min/max_pixels at the top level and name the slow class.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    proc = load_image_processor(tmp_path)
    assert _tokens(proc, 1000, 1000) == 36 * 36  # resized to 1008², 72² patches, merged 2×2
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}))
    proc = load_image_processor(tmp_path)
    assert proc.patch_size == 16 and _tokens(proc, 1000, 1000) == 31 * 31
    small = load_image_processor(tmp_path, max_pixels=32 * 32 * 64)
    assert _tokens(small, 1000, 1000) == 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_logprobs_track_cpu_float32(tiny_policy_dir):
    from mars_cli import protocol
    from mars_cli.models.logprobs import token_logprobs

    cpu = load_policy(tiny_policy_dir)
    gpu = load_policy(tiny_policy_dir, device="cuda")
    assert next(gpu.model.parameters()).dtype == torch.bfloat16 and gpu.device.type == "cuda"
    ids = protocol.render([{"role": "user", "content": "Name three colours."}], cpu.tokenizer, cpu.special)[0]
    a = token_logprobs(cpu, [(ids, [])])[0]
    b = token_logprobs(gpu, [(ids, [])])[0]
    assert b.device.type == "cuda" and b.dtype == torch.float32
    assert (a - b.cpu()).abs().max() < 0.05  # bf16 weights: close, not equal
