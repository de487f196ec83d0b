"""A tiny random-weight Qwen-VL checkpoint, made locally for tests and the offline demo.

The checkpoint is a real Qwen2.5-VL or Qwen3-VL architecture shrunk to a 64-wide, 2-layer
language model and a 2-block, 32-wide vision tower, with the real Qwen vocabulary and
special-token ids, so every code path (tokenizer, placeholder expansion, M-RoPE, generate,
training) runs as it would on a 7B model, in a second on a CPU. `vocab=N` cuts the
vocabulary to Qwen's first N tokens (special-token ids then start at N), for a model that
trains many times faster on a CPU, as the offline demo's does. The directory holds what a
released checkpoint holds (config, safetensors, tokenizer, chat template,
preprocessor_config.json, generation_config.json) and loads with the transformers classes
alone. Same seed, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mars_cli.errors import MarsError
from mars_cli.fsutil import atomic_dir, sha256_file
from mars_cli.models import qwen_vocab

ARCHS = ("qwen2.5-vl", "qwen3-vl")
META_FILE = "mars_model.json"

# Small enough that a 4K photo becomes 256 image tokens on a CPU (28*28 pixels per token
# at patch 14, merge 2); real checkpoints keep their own (much larger) limits.
TINY_PIXELS = {"qwen2.5-vl": (56 * 56, 28 * 28 * 256), "qwen3-vl": (64 * 64, 32 * 32 * 256)}

# A ChatML template (Qwen's conversation format) that renders exactly what
# mars_cli.protocol renders: images as <|vision_start|><|image_pad|><|vision_end|>, tool
# results as a user turn wrapped in <tool_response>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}{%- set parts = [{'type': 'text', 'text': message.content}] -%}"
    "{%- else -%}{%- set parts = message.content or [] -%}{%- endif -%}"
    "{%- if message.role == 'tool' -%}{{- '<|im_start|>user\\n<tool_response>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message.role + '\\n' -}}{%- endif -%}"
    "{%- for part in parts -%}"
    "{%- if part.type == 'image' or part.type == 'image_url' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message.role == 'tool' -%}{{- '\\n</tool_response>' -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _configs(arch: str, special: dict[str, int], *, vocab_size: int | None = None, layers: int = 2, width: int = 64,
             head_dim: int = 16):
    """The transformers config object of the tiny model of `arch`.

    `vocab_size`: the embedding rows of a truncated vocabulary (None: Qwen's own).
    `width`: the language model's hidden size, a multiple of 2 × `head_dim` (MLP 2x);
    `head_dim`: the size of an attention head, a multiple of 16 (half as many KV heads).
    """
    check_shape(width, head_dim)
    # M-RoPE splits a head's head_dim/2 frequencies into (temporal, height, width) sections
    # in the released models' proportions: Qwen2.5-VL 2:3:3, Qwen3-VL 4:2:2.
    q = head_dim // 16
    common_text = dict(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=width // head_dim, num_key_value_heads=width // (2 * head_dim), hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
    )
    ids = dict(image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
               vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"])
    if arch == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        text = dict(common_text, vocab_size=vocab_size or 152064,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [2 * q, 3 * q, 3 * q]})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=width,
                      fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu")
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if arch == "qwen3-vl":
        from transformers import Qwen3VLConfig

        text = dict(common_text, vocab_size=vocab_size or 151936, head_dim=head_dim,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                     "mrope_section": [4 * q, 2 * q, 2 * q], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=width,
                      num_position_embeddings=64, deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh")
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    raise MarsError(f"unknown architecture {arch!r} (expected one of: {', '.join(ARCHS)})")


def _preprocessor_config(arch: str) -> dict:
    min_pixels, max_pixels = TINY_PIXELS[arch]
    qwen3 = arch == "qwen3-vl"
    mean, std = ([0.5] * 3, [0.5] * 3) if qwen3 else ([0.48145466, 0.4578275, 0.40821073],
                                                      [0.26862954, 0.26130258, 0.27577711])
    return {
        "image_processor_type": "Qwen2VLImageProcessorPil",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "resample": 3, "image_mean": mean, "image_std": std,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "patch_size": 16 if qwen3 else 14, "temporal_patch_size": 2, "merge_size": 2,
    }


def make_tiny_model(out_dir: str | Path, *, arch: str = "qwen2.5-vl", seed: int = 0, vocab: int | None = None,
                    layers: int = 2, width: int = 64, head_dim: int = 16) -> Path:
    """Write a tiny random-weight checkpoint of `arch` into `out_dir` (atomically).

    `vocab` keeps only Qwen's first `vocab` BPE tokens (special tokens right after): the
    same tokenizer stopped early, so text takes more, commoner tokens and the output layer
    (most of a tiny model's compute) shrinks with it. `layers`: language-model depth;
    `width`: its hidden size (a multiple of 2 × `head_dim`); `head_dim`: the attention head
    size, a multiple of 16 (vLLM's CPU attention needs at least 32).
    """
    import torch

    from mars_cli.models.load import quiet_deepspeed, quiet_transformers

    quiet_deepspeed()  # transformers imports DeepSpeed (and its "accelerator" warning) when installed
    quiet_transformers()
    if arch not in ARCHS:
        raise MarsError(f"unknown architecture {arch!r} (expected one of: {', '.join(ARCHS)})")
    if not 1 <= layers <= 32:
        raise MarsError(f"--layers must be between 1 and 32, got {layers}")
    check_shape(width, head_dim)
    out_dir = Path(out_dir)
    # Replacing is for re-making a tiny model; never swap away some other directory.
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file())):
        raise MarsError(f"{out_dir}: exists and is not a tiny model made by mars; choose another path")
    with atomic_dir(out_dir) as tmp:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is not
        special = qwen_vocab.write_tokenizer_files(tmp, arch, CHAT_TEMPLATE, vocab)
        # A truncated vocabulary's rows: up to a multiple of 64 past the special tokens,
        # as the real checkpoints pad theirs.
        vocab_size = None if vocab is None else -(-(max(special.values()) + 1) // 64) * 64
        config = _configs(arch, special, vocab_size=vocab_size, layers=layers, width=width, head_dim=head_dim)
        model_cls = _model_class(arch)
        # Initialise on a private generator state so the weights depend on the seed only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
        model.eval()
        model.generation_config.update(
            bos_token_id=special["<|endoftext|>"], pad_token_id=special["<|endoftext|>"],
            eos_token_id=[special["<|im_end|>"], special["<|endoftext|>"]], do_sample=True,
            temperature=1.0, top_p=1.0, top_k=0,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(arch), indent=2) + "\n")
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        params = sum(p.numel() for p in model.parameters())
        write_meta(tmp, arch=arch, seed=seed, params=params, **({"vocab": vocab} if vocab else {}),
                   **({"head_dim": head_dim} if head_dim != 16 else {}))
    return out_dir


def check_shape(width: int, head_dim: int) -> None:
    if head_dim < 16 or head_dim % 16:
        raise MarsError(f"--head-dim must be a positive multiple of 16, got {head_dim}")
    if not 32 <= width <= 1024 or width % (2 * head_dim):
        raise MarsError(f"--width must be a multiple of 2 × --head-dim ({2 * head_dim}) in [32, 1024], got {width}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe(model_dir: str | Path) -> dict:
    """The record `mars tiny-model` prints: path, arch, params, vocab_size, fingerprint."""
    from mars_cli.models.load import fingerprint

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    config = json.loads((model_dir / "config.json").read_text())
    vocab = (config.get("text_config") or {}).get("vocab_size", config.get("vocab_size"))
    return {"path": str(model_dir), "arch": meta["arch"], "seed": meta["seed"], "params": meta["params"],
            "vocab_size": vocab, **({"head_dim": meta["head_dim"]} if "head_dim" in meta else {}),
            "fingerprint": fingerprint(model_dir)}


def _model_class(arch: str):
    import transformers

    return {"qwen2.5-vl": transformers.Qwen2_5_VLForConditionalGeneration,
            "qwen3-vl": transformers.Qwen3VLForConditionalGeneration}[arch]


def write_meta(model_dir: str | Path, **fields) -> dict:
    """Record a content fingerprint of the weights (with their stats) in mars_model.json.

    load.fingerprint trusts it only while config.json is unchanged and every weights file
    still has the recorded size and mtime, so a checkpoint rewritten in place never keeps
    a stale fingerprint.
    """
    from mars_cli.models.load import weight_files, _short_hash

    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    content = [(p.name, sha256_file(p)) for p in files]
    config = (model_dir / "config.json").read_bytes()
    meta = dict(fields)
    meta["fingerprint"] = _short_hash(config, repr(content).encode())
    meta["files"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    meta["config_sha256"] = hashlib.sha256(config).hexdigest()
    (model_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
