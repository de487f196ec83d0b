"""`mars crop IMG X0 Y0 X1 Y1`: the agent's crop tool, on the command line (one box or many)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mars_cli.errors import MarsError, UsageError
from mars_cli.flags import renamed


@renamed({"--out-dir": "--artifacts", "-q": ("--quality", str.isdigit)})
def main(
    ctx: typer.Context,
    image: Optional[str] = typer.Argument(None, help="Image file (or file:// URL): JPEG, PNG, WebP, TIFF, BMP or GIF [default: records on stdin]."),
    x0: Optional[float] = typer.Argument(None, help="Left edge, 0 (left) to 1 (right)."),
    y0: Optional[float] = typer.Argument(None, help="Top edge, 0 (top) to 1 (bottom)."),
    x1: Optional[float] = typer.Argument(None, help="Right edge, greater than X0."),
    y1: Optional[float] = typer.Argument(None, help="Bottom edge, greater than Y0."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Write the crop to this file; the format comes from its extension."
    ),
    out_dir: Optional[Path] = typer.Option(
        None, "--artifacts", envvar="MARS_ARTIFACTS",
        help="Without -o: write the crop here under a content-hash name (default: the current directory).",
    ),
    fmt: str = typer.Option("jpg", "--format", help="Format of a content-hash named crop: jpg, png, webp, tif, bmp."),
    units: str = typer.Option("1", "--units", help="Box units: 1 (normalized), 1000 (0-1000, as Qwen-VL and bbox_2d), "
                                                   "auto (1000 when any coordinate is above 1)."),
    clamp: bool = typer.Option(False, "--clamp", help="Clamp coordinates into [0, 1] and order inverted pairs (with a warning that shows the change)."),
    min_side: int = typer.Option(28, "--min-side", help="Upscale crops with a shorter side, keeping the aspect ratio (0: never)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Smart-resize: at most this many pixels, sides multiples of 28."),
    min_pixels: Optional[int] = typer.Option(None, "--min-pixels", help="Smart-resize: at least this many pixels, sides multiples of 28."),
    quality: int = typer.Option(90, "--quality", min=1, max=100, help="JPEG/WebP quality."),
    max_image_pixels: Optional[int] = typer.Option(
        None, "--max-image-pixels", envvar="MARS_MAX_IMAGE_PIXELS",
        help="Refuse larger source images as decompression bombs (default: 200000000).",
    ),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Batch mode: skip unparsable lines with a warning."),
) -> None:
    """Crop a normalized box out of an image.

    The box X0 Y0 X1 Y1 is in [0, 1] on the image as displayed (EXIF orientation applied); --units 1000 reads the 0-1000 boxes models write. On a WxH image the crop is the pixels from floor(X0*W), floor(Y0*H) to ceil(X1*W), ceil(Y1*H) (exclusive), so it always covers the box. Out-of-range or inverted boxes are errors unless --clamp, which warns with the box before and after. Prints one JSON record: source, box, box_px, size, path, image_size. Negative numbers need `--` first: mars crop --clamp img.jpg -- -0.1 0 0.5 0.5.

    Batch mode (no box arguments): one process crops every box of the JSONL records on stdin, each image decoded once. A record is {"image": PATH, "box": [X0, Y0, X1, Y1]} (or "bbox_2d" in 0-1000 units; IMAGE given as the argument serves records without "image"; an "out" field names that crop's file). Each record is written back with the crop's fields added; crops go to --artifacts under content-hash names. A record that fails is reported on stderr with its line, the others are written, and the exit status is 1.
    """
    from mars_cli.jsonl import RecordWriter
    from mars_cli.streams import warn
    from mars_cli.tools.crop import crop_image
    from mars_cli.tools.crop_batch import UNITS, prepare_box

    if units not in UNITS:
        raise UsageError(f"--units must be 1, 1000 or auto, got {units!r}")
    if out is not None and out_dir is not None:
        # MARS_ARTIFACTS only sets a default; an explicit -o wins over it.
        if getattr(ctx.get_parameter_source("out_dir"), "name", None) == "COMMANDLINE":
            raise UsageError("give -o FILE or --artifacts DIR, not both")
        out_dir = None
    opts = dict(min_side=min_side, max_pixels=max_pixels, min_pixels=min_pixels, quality=quality, fmt=fmt,
                max_image_pixels=max_image_pixels)
    box = [x0, y0, x1, y1]
    if any(v is None for v in box):
        if any(v is not None for v in box):
            raise UsageError("give all four box numbers X0 Y0 X1 Y1, or none (boxes as records on stdin)")
        return _batch(image, out, out_dir, units, clamp, skip_bad, opts)
    try:
        unit_box = prepare_box(box, units=units, clamp=clamp, warn=warn)
    except MarsError as e:  # the box came from the arguments: a usage error (in records it is bad data)
        raise UsageError(str(e)) from None
    result = crop_image(image, unit_box, out=out, out_dir=out_dir, **opts)
    with RecordWriter() as w:
        w.write(result)


def _batch(image, out, out_dir, units, clamp, skip_bad, opts) -> None:
    import sys

    from mars_cli.jsonl import RecordWriter, read_located
    from mars_cli.paths import resolve
    from mars_cli.streams import progress, warn
    from mars_cli.tools.crop import crop_image
    from mars_cli.tools.crop_batch import crop_records

    if out is not None:
        raise UsageError("-o names one crop's file; in batch mode crops go to --artifacts (or each record's \"out\")")
    if sys.stdin.isatty():
        raise UsageError("give IMAGE X0 Y0 X1 Y1, or box records on stdin (batch mode)")

    def crop(src, box, out=None):
        return crop_image(resolve(src), box, out=out, out_dir=None if out else out_dir, **opts)

    failures: list[str] = []
    items = read_located(None, skip_bad=skip_bad)
    bar = progress(desc="crop", unit="crops")
    with RecordWriter() as w:
        for rec in crop_records(items, crop, units=units, clamp=clamp, image=str(image) if image else None,
                                warn=warn, failures=failures):
            w.write(rec)
            bar.update(1)
    bar.close()
    if failures:
        raise MarsError(f"{len(failures)} of the crops failed (see above)")
