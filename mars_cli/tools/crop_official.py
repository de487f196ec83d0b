"""The official zoom crops: the training loop's (`sensenova`) and the evaluation script's
(`sensenova-eval`). The two halves of the released code cut differently.

`crop_model_view` — the verl fork's image_zoom_in_tool crops the image as the model sees it:

1. the image is first resized the Qwen-VL way (smart_resize: sides multiples of `factor`,
   area within [min_pixels, max_pixels], bicubic) — the view the model was given;
2. the box, in 0–1000 units of that view, is clamped to it and cut at
   (int(x1·W), int(y1·H), int(x2·W), int(y2·H)) — no padding;
3. a crop narrower or lower than 28 px is stretched to 28 on that side (Lanczos);
4. the crop is resized by smart_resize again, so a small crop is upscaled to at least
   min_pixels (65,536 by default), and kept lossless (PNG).

A crop of a crop starts from the saved crop, which already is a model view.

`crop_original` — inference/eval.py's crop_image (eval.py:326-376) cuts the full-resolution
ORIGINAL instead, then steps 3 and 4. Its clamp is one-sided (x1, y1 ≥ 0 and x2, y2 ≤ 1,
eval.py:348-349): a box with no area gives a stretched empty crop, an inverted one a
ValueError (eval.py fails the sample). For [100, 200, 300, 400] on an 8064×5241 photo
the two give 704×448 (model view) and 1600×1056 (original).

mars's own profile instead cuts from the full-resolution source (tools/crop.py); see README.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from mars_cli import images, sensenova
from mars_cli.errors import MarsError
from mars_cli.spool import store


def _resized(im, factor: int, min_pixels: int, max_pixels: int):
    from PIL import Image

    h, w = sensenova.smart_resize(im.height, im.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return im if (w, h) == im.size else im.resize((w, h), Image.Resampling.BICUBIC)


def _finish(crop, factor: int, min_pixels: int, max_pixels: int):
    """Steps 3 and 4: stretch a thin crop to 28 px, then smart-resize it."""
    from PIL import Image

    w, h = crop.size
    side = sensenova.CROP_MIN_SIDE
    if w < side or h < side:
        crop = crop.resize((max(w, side), max(h, side)), Image.Resampling.LANCZOS)
    return _resized(crop, factor, min_pixels, max_pixels)


def _save(crop, out_dir) -> str:
    """The crop as a PNG (Pillow's default encoder, as the official code sends it), named by content."""
    buf = io.BytesIO()
    crop.save(buf, "PNG")
    data = buf.getvalue()
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MarsError(f"{folder}: cannot create the output directory ({e.strerror or e})") from None
    return os.fspath(store(folder, data, ".png"))


def crop_model_view(src: str | os.PathLike, bbox_2d, *, out_dir: str | os.PathLike, factor: int = 32,
                    min_pixels: int = sensenova.MIN_PIXELS, max_pixels: int = sensenova.MAX_PIXELS) -> dict:
    """Cut `bbox_2d` (0–1000 units) from the model's view of `src`; write a PNG, describe it."""
    from PIL import Image

    x1, y1, x2, y2 = (min(max(float(v) / 1000.0, 0.0), 1.0) for v in bbox_2d)
    arr = images.load_array(src)
    view = _resized(Image.fromarray(arr), factor, min_pixels, max_pixels)
    W, H = view.size
    box = (int(x1 * W), int(y1 * H), int(x2 * W), int(y2 * H))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise MarsError(f"bbox_2d {list(bbox_2d)} covers no pixel of the {W}x{H} image")
    crop = _finish(view.crop(box), factor, min_pixels, max_pixels)
    return {"source": os.fspath(src), "box": [x1, y1, x2, y2], "box_px": list(box), "size": list(crop.size),
            "path": _save(crop, out_dir), "image_size": [W, H]}


def crop_original(src: str | os.PathLike, bbox, *, out_dir: str | os.PathLike, factor: int = 32,
                  min_pixels: int = sensenova.MIN_PIXELS, max_pixels: int = sensenova.MAX_PIXELS) -> dict:
    """Cut `bbox` (0–1000 units) from the full-resolution `src`, then resize the crop (eval.py).

    Raises ValueError or TypeError where eval.py does (an inverted box, a non-number):
    the caller fails the episode, as eval.py fails the sample.
    """
    from PIL import Image

    x1, y1, x2, y2 = (float(c) / 1000.0 for c in bbox)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(1, x2), min(1, y2)  # one-sided, as eval.py:348-349
    original = Image.fromarray(images.load_array(src))
    W, H = original.size
    box = (int(x1 * W), int(y1 * H), int(x2 * W), int(y2 * H))
    crop = _finish(original.crop(box), factor, min_pixels, max_pixels)
    return {"source": os.fspath(src), "box": [x1, y1, x2, y2], "box_px": list(box), "size": list(crop.size),
            "path": _save(crop, out_dir), "image_size": [W, H]}
