"""Model inputs from stored token ids, and per-token log-probs.

Trajectories store ONE <|image_pad|> per image (short, tokenizer-independent of image
size). The model wants each pad expanded to the image's patch count, grid_t·grid_h·grid_w
/ merge², exactly as the Qwen processor expands it, plus pixel_values, image_grid_thw and
mm_token_type_ids (1 at image tokens: transformers 5 builds M-RoPE positions from it).
`Batch.positions` maps each stored index to its expanded index, so log-probs come back
aligned to the stored ids that rollout, judge and update all index by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from mars_cli.errors import MarsError

# Rows of the vocabulary projection computed at once: bounds the float32 (rows × vocab)
# block to ~150 MB at a 152k vocabulary, large enough to keep a GPU matmul efficient.
LOGIT_CHUNK = 256


@dataclass
class Batch:
    """A padded model input: `model(**batch.tensors)`; `positions[b][i]` = expanded index."""

    tensors: dict
    positions: list = field(default_factory=list)
    lengths: list = field(default_factory=list)  # expanded (unpadded) length of each row
    pad_side: str = "right"


def _load_image(image) -> Any:
    """An RGB PIL image from a PIL image or a path (the one place images are opened)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    try:
        from mars_cli.images import load_image
    except ImportError:  # the images module is optional for this layer
        from PIL import ImageOps

        try:
            with Image.open(image) as im:
                return ImageOps.exif_transpose(im).convert("RGB")
        except (OSError, ValueError) as e:
            raise MarsError(f"{image}: cannot read image: {e}") from None
    return load_image(image)


def _image_size(image) -> tuple[int, int]:
    """(width, height) as displayed, without decoding when the images module can."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    try:
        from mars_cli.images import image_size
    except ImportError:
        return _load_image(image).size
    return image_size(image)


def image_tokens(policy, image) -> int:
    """How many <|image_pad|> tokens one image expands to for this policy."""
    w, h = _image_size(image)
    proc = policy.image_processor
    try:
        patches = proc.get_number_of_image_patches(h, w, {})
    except ValueError as e:  # smart_resize refuses aspect ratios over 200
        raise MarsError(f"{image if isinstance(image, str) else 'image'}: {e}") from None
    return int(patches) // (int(proc.merge_size) ** 2)


def _process_images(policy, images: list):
    """pixel_values and image_grid_thw for the images, in order (each path decoded once)."""
    proc = policy.image_processor
    decoded: dict[str, Any] = {}
    pil = []
    for im in images:
        if isinstance(im, (str, bytes)) or hasattr(im, "__fspath__"):
            key = str(im)
            if key not in decoded:
                decoded[key] = _load_image(im)
            pil.append(decoded[key])
        else:
            pil.append(_load_image(im))
    try:
        out = proc(images=pil, return_tensors="pt")
    except ValueError as e:
        raise MarsError(f"image processor: {e}") from None
    return out["pixel_values"], out["image_grid_thw"]


def build_inputs(policy, seqs: Sequence[tuple[Sequence[int], Sequence]], *, pad_side: str = "right",
                 device=None) -> Batch:
    """Stored (ids, images) pairs → a padded, placeholder-expanded model input."""
    import torch

    if pad_side not in ("left", "right"):
        raise MarsError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if not seqs:
        raise MarsError("build_inputs: no sequences")
    sp = policy.special
    pad_id, image_pad = sp["pad"], sp["image_pad"]
    merge2 = int(policy.image_processor.merge_size) ** 2

    all_images = []
    for n, (ids, images) in enumerate(seqs):
        count = sum(1 for t in ids if t == image_pad)
        if count != len(images):
            raise MarsError(f"sequence {n}: {count} image placeholder{'s' if count != 1 else ''} "
                            f"but {len(images)} image{'s' if len(images) != 1 else ''}")
        if not ids:
            raise MarsError(f"sequence {n}: no token ids")
        all_images.extend(images)
    pixel_values = grid = None
    if all_images:
        pixel_values, grid = _process_images(policy, all_images)
        sizes = (grid.prod(-1) // merge2).tolist()
    expanded, positions = [], []
    k = 0
    for ids, _images in seqs:
        out: list[int] = []
        pos = torch.empty(len(ids), dtype=torch.long)
        for i, t in enumerate(ids):
            pos[i] = len(out)
            if t == image_pad:
                out.extend([image_pad] * sizes[k])
                k += 1
            else:
                out.append(int(t))
        expanded.append(out)
        positions.append(pos)

    width = max(len(e) for e in expanded)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, e in enumerate(expanded):
        off = width - len(e) if pad_side == "left" else 0
        input_ids[b, off:off + len(e)] = torch.tensor(e, dtype=torch.long)
        attention[b, off:off + len(e)] = 1
        positions[b] += off
    mm_types = ((input_ids == image_pad) & attention.bool()).to(torch.int)
    tensors = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm_types}
    if pixel_values is not None:
        tensors["pixel_values"] = pixel_values
        tensors["image_grid_thw"] = grid
    if device is not None:
        tensors = {key: v.to(device) for key, v in tensors.items()}
    return Batch(tensors=tensors, positions=positions, lengths=[len(e) for e in expanded], pad_side=pad_side)


def _unwrap(model):
    """The transformers model inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module") and not hasattr(model, "lm_head"):
        model = model.module
    return model


def _chunk_logprobs(hidden, weight_fn, targets):
    """log softmax(lm_head(hidden))[target] in float32, via logsumexp − gathered logit."""
    import torch

    logits = weight_fn(hidden).float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(policy, seqs, *, pad_side: str = "right", grad: bool = False, model=None,
                   masks: Sequence[Sequence[int]] | None = None, batch: Batch | None = None) -> list:
    """Per sequence, log p(ids[i] | ids[:i]) at every stored index (index 0 → 0.0).

    Computed from one forward of the expanded input: the logits at expanded position p−1
    score the token at expanded position p. With `masks`, only indices whose mask is 1 are
    scored (the rest are 0.0), which skips the vocabulary projection for prompt and tool
    tokens. `model` overrides policy.model (a DeepSpeed engine's module, for training).
    """
    import contextlib

    import torch
    from torch.utils.checkpoint import checkpoint

    net = _unwrap(model if model is not None else policy.model)
    if batch is None:
        batch = build_inputs(policy, seqs, pad_side=pad_side)
    dev = next(net.parameters()).device
    tensors = {k: v.to(dev) for k, v in batch.tensors.items()}
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    results = []
    with ctx:
        # The backbone's hidden states, then the vocabulary projection only at the rows that
        # are scored, in chunks: a full (batch × length × 151k) logits tensor never exists.
        hidden = net.model(**tensors, use_cache=False).last_hidden_state
        lm_head = net.lm_head
        for b, (ids, _images) in enumerate(seqs):
            n = len(ids)
            ids_t = torch.as_tensor(list(ids), dtype=torch.long, device=dev)
            want = torch.arange(1, n, device=dev)
            if masks is not None:
                m = torch.as_tensor(list(masks[b]), device=dev)
                if len(m) != n:
                    raise MarsError(f"sequence {b}: mask has {len(m)} entries for {n} ids")
                want = want[m[1:] != 0]
            out = torch.zeros(n, dtype=torch.float32, device=dev)
            if len(want):
                rows = batch.positions[b].to(dev)[want] - 1
                h = hidden[b, rows]
                tgt = ids_t[want]
                parts = []
                for s in range(0, len(want), LOGIT_CHUNK):
                    hs, ts = h[s:s + LOGIT_CHUNK], tgt[s:s + LOGIT_CHUNK]
                    if grad and torch.is_grad_enabled():
                        # Recompute the chunk's logits in backward instead of keeping them.
                        parts.append(checkpoint(_chunk_logprobs, hs, lm_head, ts, use_reentrant=False))
                    else:
                        parts.append(_chunk_logprobs(hs, lm_head, ts))
                out = out.index_put((want,), torch.cat(parts))
            results.append(out)
    return results
