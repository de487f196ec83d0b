"""Drawing the synthetic benchmark's 4K scenes: textured clutter and one small named sign.

Cheap by design (64 scenes in seconds): the texture is numpy noise drawn at a low
resolution and upscaled by Pillow (bilinear, in C), the clutter a few dozen shapes and
decoy words, and the target a yellow plate whose text is readable in a crop but only a
few pixels tall once the whole 4K canvas is shrunk to a model's input size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CANVAS = (3840, 2160)
PLATE_FILL = (250, 214, 40)
PLATE_EDGE = (30, 30, 30)
TEXT_INK = (20, 20, 20)
_fonts: dict[int, ImageFont.FreeTypeFont] = {}


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled TrueType font (needs no system fonts), cached per size."""
    if size not in _fonts:
        _fonts[size] = ImageFont.load_default(size=size)
    return _fonts[size]


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    coarse = rng.integers(40, 216, size=(9, 16, 3), dtype=np.uint8)
    fine = rng.integers(0, 256, size=(h // 24, w // 24, 3), dtype=np.uint8)
    # Blend at a quarter of the size, then one upscale: a 4K resize is the costly step.
    small = (w // 4, h // 4)
    a = Image.fromarray(coarse).resize(small, Image.Resampling.BILINEAR)
    b = Image.fromarray(fine).resize(small, Image.Resampling.BILINEAR)
    return Image.blend(a, b, 0.35).resize(size, Image.Resampling.BILINEAR)


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int], decoys: list[str]) -> None:
    w, h = size
    for _ in range(int(rng.integers(25, 45))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(40, 700)), y0 + int(rng.integers(40, 500))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=_color(rng))
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=_color(rng))
        else:
            draw.line((x0, y0, x1, y1), fill=_color(rng), width=int(rng.integers(4, 30)))
    # Decoy words in other colours and no plate: reading "the yellow sign" needs a look.
    for word in decoys:
        x, y = int(rng.integers(0, w - 400)), int(rng.integers(0, h - 80))
        draw.text((x, y), word, font=font(int(rng.integers(22, 40))), fill=_color(rng))


def draw_scene(rng: np.random.Generator, label: str, decoys: list[str], *, size: tuple[int, int] = CANVAS, text_px: int = 34) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A cluttered canvas with `label` on a small yellow plate; returns (image, plate box in px)."""
    w, h = size
    img = _texture(rng, size)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, size, decoys)
    f = font(text_px)
    left, top, right, bottom = f.getbbox(label)
    pad = text_px // 2
    pw, ph = right - left + 2 * pad, bottom - top + 2 * pad
    if pw * ph > 0.05 * w * h or pw > w - 40 or ph > h - 40:
        raise ValueError(f"label {label!r} is too large for the canvas")
    x = int(rng.integers(20, w - pw - 20))
    y = int(rng.integers(20, h - ph - 20))
    box = (x, y, x + pw, y + ph)
    draw.rectangle(box, fill=PLATE_FILL, outline=PLATE_EDGE, width=max(2, text_px // 10))
    draw.text((x + pad - left, y + pad - top), label, font=f, fill=TEXT_INK)
    return img, box


def encode_jpeg(img: Image.Image, quality: int = 85) -> bytes:
    """JPEG bytes through libjpeg-turbo (simplejpeg) when available, else Pillow."""
    try:
        import simplejpeg

        return simplejpeg.encode_jpeg(np.asarray(img), quality=quality, colorspace="RGB", colorsubsampling="420")
    except ImportError:
        import io

        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return buf.getvalue()
