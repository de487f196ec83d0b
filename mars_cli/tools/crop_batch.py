"""`mars crop` beyond one box: 0–1000 units, said-out-loud clamping, and batch mode.

Units. A box is normalized ([0, 1]) by default. `units="1000"` reads it in the 0–1000
relative units Qwen-VL models and the SenseNova-MARS zoom tool (`bbox_2d`) use;
`units="auto"` reads a box in 0–1000 units when any coordinate is above 1, else
normalized. (A 0–1000 box entirely inside [0, 1] would be 1/1000 of the image, which
no model means, so the rule cannot pick the wrong one for real boxes.)

Clamping. `clamp` still clamps into [0, 1] and orders inverted pairs, but never
silently: whenever a coordinate moves, the warning gives the box before and after, and
a box that became the whole image from out-of-range numbers names the likely cause.

Batch mode. One process crops many boxes from many images: JSONL records on stdin
(`{"image": PATH, "box": [x0, y0, x1, y1]}`, or `bbox_2d` in 0–1000 units, optional
`out`), each image decoded once (the image cache) however many boxes it has. Each
record comes back with the crop's fields added; a record that fails is reported with
its line on stderr and the rest go on.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from mars_cli.errors import MarsError, UsageError
from mars_cli.tools.crop import check_box

UNITS = ("1", "1000", "auto")


def to_unit_box(box, units: str) -> tuple[list[float], str]:
    """(the box in [0, 1] units, the units it was read in: "1" or "1000")."""
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise MarsError(f"box must be four numbers (x0, y0, x1, y1), got {box!r}") from None
    if units not in UNITS:
        raise UsageError(f"--units must be 1, 1000 or auto, got {units!r}")
    if units == "auto":
        units = "1000" if any(v > 1 for v in vals) else "1"
    return ([v / 1000 for v in vals] if units == "1000" else vals), units


def _shown(vals) -> str:
    return "(" + ", ".join(f"{v:g}" for v in vals) + ")"


def prepare_box(box, *, units: str = "1", clamp: bool = False, warn: Callable[[str], None] | None = None,
                where: str = "") -> tuple[float, float, float, float]:
    """A valid normalized box; with `clamp`, any change is reported through `warn`."""
    vals, used = to_unit_box(box, units)
    prefix = f"{where}: " if where else ""
    if not clamp:
        try:
            return check_box(vals)
        except MarsError as e:
            if used == "1" and any(1 < v <= 1000 for v in vals):
                raise MarsError(f"{e}; a 0-1000 box? pass --units 1000 (or --units auto)") from None
            raise
    out = check_box(vals, clamp=True)
    if [round(v, 12) for v in out] != [round(v, 12) for v in vals] and warn is not None:
        msg = f"{prefix}box {_shown(box)} clamped to {_shown(out)}"
        if out == (0.0, 0.0, 1.0, 1.0):
            msg += ": that is the whole image"
        if used == "1" and any(1 < v <= 1000 for v in vals):
            msg += "; a 0-1000 box? pass --units 1000"
        warn(msg)
    return out


def crop_records(items: Iterable, crop: Callable, *, units: str, clamp: bool, image: str | None,
                 warn: Callable[[str], None], failures: list) -> Iterator[dict]:
    """(where, record) pairs → records with the crop's fields; failures listed, not raised."""
    for where, rec in items:
        try:
            src = rec.get("image", image)
            if isinstance(src, list):
                src = src[0] if src else None
            if not isinstance(src, str) or not src:
                raise MarsError("no 'image' in the record (and no IMAGE argument)")
            rec_units, box = units, rec.get("box")
            if box is None and rec.get("bbox_2d") is not None:
                rec_units, box = "1000", rec["bbox_2d"]
            if box is None:
                raise MarsError("no 'box' (or 'bbox_2d') in the record")
            unit_box = prepare_box(box, units=str(rec.get("units", rec_units)), clamp=clamp, warn=warn, where=str(where))
            result = crop(src, unit_box, out=rec.get("out"))
        except MarsError as e:
            failures.append(f"{where}: {e}")
            warn(f"{where}: {e}")
            continue
        yield {**rec, **result}
