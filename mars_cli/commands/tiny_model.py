"""`mars tiny-model OUT`: a tiny random-weight Qwen-VL checkpoint for tests and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mars_cli.errors import UsageError

ARCH_CHOICES = ("qwen2.5-vl", "qwen3-vl")


def main(
    out: Optional[Path] = typer.Argument(None, help="Directory to write the checkpoint to (replaced if it is a tiny model)."),
    out_opt: Optional[Path] = typer.Option(None, "--out", "-o", help="The same as OUT."),
    arch: str = typer.Option("qwen2.5-vl", "--arch", envvar="MARS_TINY_ARCH",
                             help="Architecture: qwen2.5-vl or qwen3-vl."),
    seed: int = typer.Option(0, "--seed", help="Weight initialisation seed (same seed, same weights)."),
    vocab: int = typer.Option(None, "--vocab", min=256, max=151643,
                              help="Keep only Qwen's first N BPE tokens (special tokens follow at N): "
                                   "a model that trains many times faster on a CPU. Default: all 151,643."),
    layers: int = typer.Option(2, "--layers", min=1, max=32, help="Language-model layers."),
    width: int = typer.Option(64, "--width", min=32, max=1024, help="Language-model hidden size, a multiple of 2 × --head-dim (MLP twice as wide)."),
    head_dim: int = typer.Option(16, "--head-dim", min=16, max=256, help="Attention head size, a multiple of 16 (half as many KV heads as heads); vLLM's CPU attention needs 32 or more."),
) -> None:
    """Write a tiny random-weight VLM checkpoint.

    A real Qwen2.5-VL or Qwen3-VL architecture shrunk to a 64-wide (--width), 2-layer (--layers) language model
    and a 2-block vision tower, with the real Qwen vocabulary and special-token ids, a chat
    template, an image-processor config and a generation config. It loads with the
    transformers classes from the directory alone, offline, and runs the whole pipeline
    (rollout, update, sft) on a CPU in seconds. With --vocab the tokenizer is Qwen's cut
    to its first N merges, and the special tokens move to N on; everything reads their ids
    from the tokenizer. Prints one JSON record: path, arch, seed, params, vocab_size,
    fingerprint.
    """
    from mars_cli.jsonl import RecordWriter
    from mars_cli.models.tiny import describe, make_tiny_model

    if (out is None) == (out_opt is None):
        raise UsageError("give the output directory once: mars tiny-model DIR (or -o DIR)")
    out = out or out_opt
    if arch not in ARCH_CHOICES:
        raise UsageError(f"--arch must be one of {', '.join(ARCH_CHOICES)}, got {arch!r}")
    path = make_tiny_model(out, arch=arch, seed=seed, vocab=vocab, layers=layers, width=width, head_dim=head_dim)
    with RecordWriter() as w:
        w.write(describe(path))
