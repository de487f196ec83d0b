"""The official zoom crop (the `sensenova` protocol profile).

The released SenseNova-MARS tools crop the image as the model sees it, not the original:

1. the image is first resized the Qwen-VL way (smart_resize: sides multiples of `factor`,
   area within [min_pixels, max_pixels], bicubic) — the view the model was given;
2. the box, in 0–1000 units of that view, is clamped to it and cut at
   (int(x1·W), int(y1·H), int(x2·W), int(y2·H)) — no padding;
3. a crop narrower or lower than 28 px is stretched to 28 on that side (Lanczos);
4. the crop is resized by smart_resize again, so a small crop is upscaled to at least
   min_pixels (65,536 by default), and kept lossless (PNG).

A crop of a crop starts from the saved crop, which already is a model view. mars's own
profile instead cuts from the full-resolution source (tools/crop.py); see README.
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
    crop = view.crop(box)
    w, h = crop.size
    side = sensenova.CROP_MIN_SIDE
    if w < side or h < side:
        crop = crop.resize((max(w, side), max(h, side)), Image.Resampling.LANCZOS)
    crop = _resized(crop, factor, min_pixels, max_pixels)
    buf = io.BytesIO()
    crop.save(buf, "PNG")
    data = buf.getvalue()
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MarsError(f"{folder}: cannot create the output directory ({e.strerror or e})") from None
    path = store(folder, data, ".png")
    return {"source": os.fspath(src), "box": [x1, y1, x2, y2], "box_px": list(box), "size": list(crop.size),
            "path": os.fspath(path), "image_size": [W, H]}
