"""The crop tool: cut a normalized box out of the full-resolution image and save it.

`mars crop` and the agent's `image_zoom_in_tool` both call `crop_image`, so what a person
tries on the command line is exactly what the model sees.

Pixel mapping. A box is (x0, y0, x1, y1) in [0, 1] on the image as displayed (EXIF
orientation applied), with x0 < x1 and y0 < y1. On a W×H image the crop is the pixel
rectangle

    left = floor(x0·W)   top = floor(y0·H)   right = ceil(x1·W)   bottom = ceil(y1·H)

(right/bottom exclusive), so the crop always covers the whole box, and is at least one pixel
wide and high. Products within 1e-6 of an integer count as that integer, so that 0.3·1000
(= 300.00000000000006 in floating point) is the pixel edge 300 and not 301.

Thin boxes. The Qwen-VL image processor refuses an image whose sides differ by more than
200:1, so a box thinner than that (a line of text) is widened about its centre, inside
the image, until its pixel rectangle is 200:1; `box_px` records what was cut. If even the
whole image cannot give that ratio, the crop is an error.

Resizing. A crop whose short side is under `min_side` (default 28, one vision patch) is
upscaled until it is not, keeping its aspect ratio (the reference code stretched such
crops to a square, distorting them). The upscaled crop must stay within the pixel limit
and the format's largest side (JPEG 65,500 px, WebP 16,383 px), else it is an error.
With `max_pixels`/`min_pixels` the result is then resized the Qwen-VL way
(`images.smart_resize`: sides multiples of 28, area in bounds).

A crop of a crop is cut from the original image, never from a saved (downscaled,
re-encoded) crop: `compose_box` turns a box relative to a crop into one relative to the
original, and `covered_box` gives the exact region a crop shows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from mars_cli import images
from mars_cli.errors import MarsError
from mars_cli.fsutil import atomic_file
from mars_cli.spool import store

Box = tuple[float, float, float, float]
# Floating-point slack when mapping a coordinate onto a pixel edge, in pixels.
EDGE_EPS = 1e-6
NAMES = ("x0", "y0", "x1", "y1")
MAX_ASPECT = 200  # Qwen-VL's image processor refuses more elongated images
MAX_SIDE = {"JPEG": 65500, "WEBP": 16383, "PNG": 1 << 31, "TIFF": 1 << 31, "BMP": 1 << 31}


def check_box(box, *, clamp: bool = False) -> Box:
    """A valid normalized box from `box`, or a MarsError saying what is wrong.

    With `clamp`, coordinates are clamped into [0, 1] and inverted pairs put in order;
    a box with no area inside the image is still an error.
    """
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise MarsError(f"box must be four numbers (x0, y0, x1, y1), got {box!r}") from None
    if len(vals) != 4:
        raise MarsError(f"box must be four numbers (x0, y0, x1, y1), got {len(vals)}")
    for name, v in zip(NAMES, vals):
        if not math.isfinite(v):
            raise MarsError(f"box {name} is {v}, not a finite number")
    x0, y0, x1, y1 = vals
    shown = "(" + ", ".join(f"{v:g}" for v in vals) + ")"
    if clamp:
        x0, x1 = sorted((min(max(x0, 0.0), 1.0), min(max(x1, 0.0), 1.0)))
        y0, y1 = sorted((min(max(y0, 0.0), 1.0), min(max(y1, 0.0), 1.0)))
        if x0 == x1 or y0 == y1:
            raise MarsError(f"box {shown} has no area inside the image, even clamped to [0, 1]")
        return (x0, y0, x1, y1)
    for name, v in zip(NAMES, vals):
        if not 0.0 <= v <= 1.0:
            raise MarsError(f"box {shown}: {name}={v:g} is outside [0, 1] (use --clamp to clamp)")
    if x0 >= x1:
        raise MarsError(f"box {shown}: x0 must be less than x1 (inverted or empty box)")
    if y0 >= y1:
        raise MarsError(f"box {shown}: y0 must be less than y1 (inverted or empty box)")
    return (x0, y0, x1, y1)


def _span(lo: float, hi: float, n: int) -> tuple[int, int]:
    a = math.floor(lo * n + EDGE_EPS)
    b = math.ceil(hi * n - EDGE_EPS)
    a = min(max(a, 0), n - 1)
    b = min(max(b, a + 1), n)
    return a, b


def box_to_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels covering a valid normalized box (see module doc)."""
    left, right = _span(box[0], box[2], width)
    top, bottom = _span(box[1], box[3], height)
    return left, top, right, bottom


def _widen(a: int, b: int, need: int, n: int) -> tuple[int, int]:
    """The span [a, b) grown about its centre to `need` pixels, kept inside [0, n)."""
    grow = need - (b - a)
    a = max(0, a - grow // 2)
    b = min(n, a + need)
    return max(0, b - need), b


def limit_aspect(px: tuple[int, int, int, int], width: int, height: int,
                 max_aspect: float = MAX_ASPECT) -> tuple[int, int, int, int]:
    """A pixel box widened on its short side to at most `max_aspect`:1 (see module doc)."""
    left, top, right, bottom = px
    w, h = right - left, bottom - top
    target = max_aspect * 0.99  # a margin, so the upscale's rounding cannot cross the limit
    if w > h * target:
        top, bottom = _widen(top, bottom, math.ceil(w / target), height)
    elif h > w * target:
        left, right = _widen(left, right, math.ceil(h / target), width)
    w, h = right - left, bottom - top
    if max(w, h) > min(w, h) * max_aspect:
        raise MarsError(f"the region is {w}x{h} pixels, thinner than {max_aspect:g}:1 even widened to the "
                        f"whole {width}x{height} image; vision models refuse such images")
    return left, top, right, bottom


def output_size(
    width: int, height: int, *, min_side: int = 28, min_pixels: int | None = None, max_pixels: int | None = None,
    fmt: str = "JPEG", max_image_pixels: int | None = None,
) -> tuple[int, int]:
    """(width, height) a crop of this size is saved at (min-side upscale, then smart resize)."""
    if min_side and min(width, height) < min_side:
        scale = min_side / min(width, height)
        up = max(min_side, round(width * scale)), max(min_side, round(height * scale))
        side = MAX_SIDE.get(fmt.upper(), MAX_SIDE["JPEG"])
        limit = images.pixel_limit(max_image_pixels)
        if max(up) > side or up[0] * up[1] > limit:
            raise MarsError(f"a {width}x{height} crop upscaled to a short side of {min_side} would be {up[0]}x{up[1]}, "
                            f"over the {side}-pixel side of {fmt.upper()} or the {limit}-pixel limit; lower --min-side")
        width, height = up
    if min_pixels is not None or max_pixels is not None:
        bounds = {}
        if min_pixels is not None:
            bounds["min_pixels"] = min_pixels
        if max_pixels is not None:
            bounds["max_pixels"] = max_pixels
        height, width = images.smart_resize(height, width, **bounds)
    return width, height


def compose_box(parent: Box, child: Box) -> Box:
    """A box given relative to a crop of `parent` → the same box relative to the original."""
    px0, py0, px1, py1 = (float(v) for v in parent)
    cx0, cy0, cx1, cy1 = (float(v) for v in child)
    pw, ph = px1 - px0, py1 - py0
    return (px0 + cx0 * pw, py0 + cy0 * ph, px0 + cx1 * pw, py0 + cy1 * ph)


def covered_box(result: dict) -> Box:
    """The exact normalized region a crop shows (its pixel box over the image size).

    Pass this, not the requested box, as `parent` to `compose_box` so that a box drawn on
    the crop maps to the pixels the model actually looked at.
    """
    left, top, right, bottom = result["box_px"]
    w, h = result["image_size"]
    return (left / w, top / h, right / w, bottom / h)


def crop_image(
    src: str | os.PathLike,
    box: Box,
    *,
    out: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    clamp: bool = False,
    min_side: int = 28,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    quality: int = 90,
    fmt: str | None = None,
    max_image_pixels: int | None = None,
    max_aspect: float | None = MAX_ASPECT,
) -> dict:
    """Crop `box` out of the image `src`, write it, and describe it.

    The file goes to `out` (format from its extension) or, when `out` is None, to
    `out_dir` (else MARS_ARTIFACTS, else the current directory) under a content-hash name
    (`fmt`, default JPEG). Returns {"source", "box", "box_px", "size", "path", "image_size"}.
    """
    if out is not None and out_dir is not None:
        raise MarsError("give either an output file or an output directory, not both")
    if not 1 <= int(quality) <= 100:
        raise MarsError(f"JPEG/WebP quality must be between 1 and 100, got {quality}")
    if min_side < 0:
        raise MarsError(f"minimum side must be 0 or more, got {min_side}")
    box = check_box(box, clamp=clamp)
    if out is not None:
        out_fmt = images.format_for(out)
    else:
        out_fmt = (fmt or "JPEG").upper()
        if out_fmt == "JPG":
            out_fmt = "JPEG"
        if out_fmt not in images.EXTENSIONS:
            raise MarsError(f"unknown output format {fmt!r}; use one of jpg, png, webp, tif, bmp")

    arr = images.load_array(src, max_image_pixels=max_image_pixels)
    height, width = arr.shape[:2]
    left, top, right, bottom = box_to_pixels(box, width, height)
    if max_aspect:
        left, top, right, bottom = limit_aspect((left, top, right, bottom), width, height, max_aspect)
    region = arr[top:bottom, left:right]
    size = output_size(right - left, bottom - top, min_side=min_side, min_pixels=min_pixels, max_pixels=max_pixels,
                       fmt=out_fmt, max_image_pixels=max_image_pixels)
    if size != (right - left, bottom - top):
        from PIL import Image

        resized = Image.fromarray(np.ascontiguousarray(region)).resize(size, Image.Resampling.BICUBIC)
        region = np.asarray(resized)
    data = images.encode(region, out_fmt, quality=int(quality))

    if out is not None:
        path = Path(out)
        _write(path, data)
    else:
        folder = Path(out_dir if out_dir is not None else os.environ.get("MARS_ARTIFACTS") or ".")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MarsError(f"{folder}: cannot create the output directory ({e.strerror or e})") from None
        # Named by content: the same crop twice is one file, and a record stays reproducible.
        path = store(folder, data, images.EXTENSIONS[out_fmt])
    return {
        "source": os.fspath(src),
        "box": list(box),
        "box_px": [left, top, right, bottom],
        "size": [int(size[0]), int(size[1])],
        "path": os.fspath(path),
        "image_size": [width, height],
    }


def _file_mode() -> int:
    """The mode a plain new file gets (0o666 less the umask), read without changing it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def _write(path: Path, data: bytes) -> None:
    if path.is_dir():
        raise MarsError(f"{path}: is a directory, expected an output file name")
    try:
        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
            # The temporary file is private (0600); a crop is an ordinary output that a
            # viewer or another user should be able to read like any file we create.
            os.chmod(tmp, _file_mode())
    except PermissionError:
        raise MarsError(f"{path}: permission denied") from None
