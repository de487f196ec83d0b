"""Model inputs from stored token ids (log-probs over them: models.logprobs).

Trajectories store ONE <|image_pad|> per image (short, tokenizer-independent of image
size). The model wants each pad expanded to the image's patch count, grid_t·grid_h·grid_w
/ merge², exactly as the Qwen processor expands it, plus pixel_values, image_grid_thw and
mm_token_type_ids (1 at image tokens: transformers 5 builds M-RoPE positions from it).
`Batch.positions` maps each stored index to its expanded index, so log-probs come back
aligned to the stored ids that rollout, judge and update all index by (models.logprobs).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from mars_cli.errors import MarsError


@dataclass
class Batch:
    """A padded model input: `model(**batch.tensors)`; `positions[b][i]` = expanded index."""

    tensors: dict
    positions: list = field(default_factory=list)
    lengths: list = field(default_factory=list)  # expanded (unpadded) length of each row, filler excluded
    pad_side: str = "right"


def _load_image(image) -> Any:
    """An RGB PIL image from a PIL image or a path (the one place images are opened)."""
    from PIL import Image

    from mars_cli.images import load_image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return load_image(image)


def _image_size(image) -> tuple[int, int]:
    """(width, height) as displayed, from the header when it is a file (no decode)."""
    from PIL import Image

    from mars_cli.images import image_size

    if isinstance(image, Image.Image):
        return image.size
    return image_size(image)


def image_processor_for(policy, pixels=None):
    """The policy's image processor, or one of the same checkpoint with other pixel limits.

    `pixels` = (min, max) total pixels per image, as a trajectory records the limits its
    rollout used (policy.pixels); None or the policy's own limits → policy.image_processor.
    Built by the same loader as the rollout's, so the patch counts agree exactly.
    """
    proc = policy.image_processor
    if pixels is None:
        return proc
    lo, hi = (int(x) for x in pixels)
    if (proc.size["shortest_edge"], proc.size["longest_edge"]) == (lo, hi):
        return proc
    from mars_cli.models.load import load_image_processor

    key = (str(policy.path), lo, hi)
    with _PROCESSORS_LOCK:
        hit = _PROCESSORS.get(key)
        if hit is None:
            hit = _PROCESSORS[key] = load_image_processor(policy.path, min_pixels=lo, max_pixels=hi)
    return hit


_PROCESSORS: dict = {}
_PROCESSORS_LOCK = threading.Lock()


def image_tokens(policy, image, pixels=None) -> int:
    """How many <|image_pad|> tokens one image expands to for this policy (and pixel limits)."""
    w, h = _image_size(image)
    proc = image_processor_for(policy, pixels)
    try:
        patches = proc.get_number_of_image_patches(h, w, {})
    except ValueError as e:  # smart_resize refuses aspect ratios over 200
        raise MarsError(f"{image if isinstance(image, str) else 'image'}: {e}") from None
    return int(patches) // (int(proc.merge_size) ** 2)


class _PixelCache:
    """Processed images (pixel_values, grid) by file identity and processor settings.

    An episode's prompt is rebuilt at every turn and a group's samples share the task
    image, so the same file is resized and patchified again and again; this keeps the
    results, bounded by bytes (MARS_PIXEL_CACHE_MB, default 512). Tensors are shared and
    treated as read-only (torch.cat copies them into each batch).
    """

    def __init__(self) -> None:
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def budget() -> int:
        from mars_cli.settings import env_number

        return int(env_number("MARS_PIXEL_CACHE_MB", 512.0, integer=False, minimum=0) * 2**20)

    def get(self, key):
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key, value) -> None:
        size = value[0].numel() * value[0].element_size()
        budget = self.budget()
        if size > budget:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > budget:
                _, old = self._items.popitem(last=False)
                self._bytes -= old[0].numel() * old[0].element_size()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_pixels = _PixelCache()


def _processor_key(proc) -> tuple:
    return (type(proc).__name__, proc.size["shortest_edge"], proc.size["longest_edge"], proc.patch_size,
            proc.merge_size, proc.temporal_patch_size, tuple(proc.image_mean), tuple(proc.image_std),
            proc.do_resize, proc.do_normalize, proc.do_rescale, proc.rescale_factor, int(proc.resample))


def _process_one(proc, pil):
    try:
        out = proc(images=[pil], return_tensors="pt")
    except ValueError as e:  # e.g. an aspect ratio over 200
        raise MarsError(f"image processor: {e}") from None
    return out["pixel_values"], out["image_grid_thw"]


def _file_key(im) -> tuple | None:
    """Identity of a local image file (path, inode, size, mtime), or None (PIL, URL, missing)."""
    if not isinstance(im, (str, os.PathLike)):
        return None
    s = os.fspath(im)
    if s.startswith("file://"):
        s = s[len("file://"):]
    elif "://" in s:
        return None
    try:
        st = os.stat(s)
    except OSError:
        return None
    return (os.path.realpath(s), st.st_ino, st.st_size, st.st_mtime_ns)


def _process_images(policy, images: list, pixels: list | None = None):
    """pixel_values and image_grid_thw for the images, in order (files cached, see _PixelCache).

    `pixels[i]`: image i's (min, max) pixel limits, or None for the policy's own.
    """
    values, grids = [], []
    for n, im in enumerate(images):
        proc = image_processor_for(policy, pixels[n] if pixels is not None else None)
        pkey = _processor_key(proc)
        key = _file_key(im)
        hit = _pixels.get(key + pkey) if key else None
        if hit is None:
            hit = _process_one(proc, _load_image(im))  # a missing file or URL: its error here
            if key:
                _pixels.put(key + pkey, hit)
        values.append(hit[0])
        grids.append(hit[1])
    return _cat(values), _cat(grids)


def _cat(parts):
    import torch

    return parts[0].clone() if len(parts) == 1 else torch.cat(parts)


def _filler_pixels(policy):
    """pixel_values and grid of the smallest image the processor makes (a blank square)."""
    from PIL import Image

    proc = policy.image_processor
    key = ("<filler>",) + _processor_key(proc)
    hit = _pixels.get(key)
    if hit is None:
        factor = int(proc.patch_size) * int(proc.merge_size)
        side = factor * max(1, math.ceil(math.sqrt(proc.size["shortest_edge"]) / factor))
        hit = _process_one(proc, Image.new("RGB", (side, side)))
        _pixels.put(key, hit)
    return hit[0].clone(), hit[1].clone()


def build_inputs(policy, seqs: Sequence[tuple[Sequence[int], Sequence]], *, pad_side: str = "right",
                 device=None, vision_filler: bool = False, pixels: Sequence | None = None) -> Batch:
    """Stored (ids, images) pairs → a padded, placeholder-expanded model input.

    `pixels[b]`: the (min, max) pixel limits sequence b's images were sampled with (None:
    the policy's own), so each image expands to exactly the patches its rollout saw.

    `vision_filler`: when no sequence has an image, still run the vision tower, on the
    smallest blank image, whose placeholders follow the last token of the shortest row.
    Causal attention keeps every real token's output unchanged; under ZeRO-3 this lets a
    rank without images join the vision tower's parameter gathers of a rank with some.
    """
    import torch

    if pad_side not in ("left", "right"):
        raise MarsError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if not seqs:
        raise MarsError("build_inputs: no sequences")
    sp = policy.special
    pad_id, image_pad = sp["pad"], sp["image_pad"]
    merge2 = int(policy.image_processor.merge_size) ** 2

    if pixels is not None and len(pixels) != len(seqs):
        raise MarsError(f"build_inputs: {len(pixels)} pixel limits for {len(seqs)} sequences")
    all_images, all_pixels = [], []
    for n, (ids, images) in enumerate(seqs):
        count = sum(1 for t in ids if t == image_pad)
        if count != len(images):
            raise MarsError(f"sequence {n}: {count} image placeholder{'s' if count != 1 else ''} "
                            f"but {len(images)} image{'s' if len(images) != 1 else ''}")
        if not ids:
            raise MarsError(f"sequence {n}: no token ids")
        all_images.extend(images)
        all_pixels.extend([pixels[n] if pixels is not None else None] * len(images))
    pixel_values = grid = None
    if all_images:
        pixel_values, grid = _process_images(policy, all_images, all_pixels)
        sizes = (grid.prod(-1) // merge2).tolist()
    elif vision_filler:
        pixel_values, grid = _filler_pixels(policy)
    # Each stored id becomes `repeats` ids (an image pad: its patch count); its expanded
    # index is the sum of the repeats before it.
    rows, positions = [], []
    k = 0
    for ids, images in seqs:
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        repeats = torch.ones_like(ids_t)
        if images:
            repeats[ids_t == image_pad] = torch.as_tensor(sizes[k:k + len(images)], dtype=torch.long)
            k += len(images)
        rows.append(torch.repeat_interleave(ids_t, repeats))
        positions.append(torch.cumsum(repeats, 0) - repeats)

    lengths = [len(r) for r in rows]
    if vision_filler and not all_images:
        r = min(range(len(rows)), key=lambda b: len(rows[b]))
        rows[r] = torch.cat([rows[r], torch.full((int(grid.prod()) // merge2,), image_pad, dtype=torch.long)])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, r in enumerate(rows):
        off = width - len(r) if pad_side == "left" else 0
        input_ids[b, off:off + len(r)] = r
        attention[b, off:off + len(r)] = 1
        positions[b] += off
    mm_types = ((input_ids == image_pad) & attention.bool()).to(torch.int)
    tensors = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm_types}
    if pixel_values is not None:
        tensors["pixel_values"] = pixel_values
        tensors["image_grid_thw"] = grid
    if device is not None:
        tensors = {key: v.to(device) for key, v in tensors.items()}
    return Batch(tensors=tensors, positions=positions, lengths=lengths, pad_side=pad_side)
