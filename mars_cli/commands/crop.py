"""`mars crop IMG X0 Y0 X1 Y1`: the agent's crop tool, on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mars_cli.errors import UsageError


def main(
    ctx: typer.Context,
    image: str = typer.Argument(..., help="Image file (or file:// URL): JPEG, PNG, WebP, TIFF, BMP or GIF."),
    x0: float = typer.Argument(..., help="Left edge, 0 (left) to 1 (right)."),
    y0: float = typer.Argument(..., help="Top edge, 0 (top) to 1 (bottom)."),
    x1: float = typer.Argument(..., help="Right edge, greater than X0."),
    y1: float = typer.Argument(..., help="Bottom edge, greater than Y0."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Write the crop to this file; the format comes from its extension."
    ),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", envvar="MARS_ARTIFACTS",
        help="Without -o: write the crop here under a content-hash name (default: the current directory).",
    ),
    fmt: str = typer.Option("jpg", "--format", help="Format of a content-hash named crop: jpg, png, webp, tif, bmp."),
    clamp: bool = typer.Option(False, "--clamp", help="Clamp coordinates into [0, 1] and order inverted pairs."),
    min_side: int = typer.Option(28, "--min-side", help="Upscale crops with a shorter side, keeping the aspect ratio (0: never)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Smart-resize: at most this many pixels, sides multiples of 28."),
    min_pixels: Optional[int] = typer.Option(None, "--min-pixels", help="Smart-resize: at least this many pixels, sides multiples of 28."),
    quality: int = typer.Option(90, "--quality", "-q", min=1, max=100, help="JPEG/WebP quality."),
    max_image_pixels: Optional[int] = typer.Option(
        None, "--max-image-pixels", envvar="MARS_MAX_IMAGE_PIXELS",
        help="Refuse larger source images as decompression bombs (default: 200000000).",
    ),
) -> None:
    """Crop a normalized box out of an image.

    The box X0 Y0 X1 Y1 is in [0, 1] on the image as displayed (EXIF orientation applied).
    On a WxH image the crop is the pixels from floor(X0*W), floor(Y0*H) to ceil(X1*W),
    ceil(Y1*H) (exclusive), so it always covers the box. Out-of-range or inverted boxes are
    errors unless --clamp. Prints one JSON record: source, box, box_px, size, path,
    image_size. Negative numbers need `--` first: mars crop --clamp img.jpg -- -0.1 0 0.5 0.5.
    """
    from mars_cli.jsonl import RecordWriter
    from mars_cli.tools.crop import crop_image

    if out is not None and out_dir is not None:
        # MARS_ARTIFACTS only sets a default; an explicit -o wins over it.
        if getattr(ctx.get_parameter_source("out_dir"), "name", None) == "COMMANDLINE":
            raise UsageError("give -o FILE or --out-dir DIR, not both")
        out_dir = None
    result = crop_image(
        image, (x0, y0, x1, y1), out=out, out_dir=out_dir, clamp=clamp,
        min_side=min_side, max_pixels=max_pixels, min_pixels=min_pixels, quality=quality, fmt=fmt,
        max_image_pixels=max_image_pixels,
    )
    with RecordWriter() as w:
        w.write(result)
