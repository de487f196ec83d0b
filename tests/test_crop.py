"""The crop tool and `mars crop`: pixel mapping, resizing, compose_box, outputs, every refusal."""

from __future__ import annotations

import json
import os
import stat
import random
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from mars_cli import images
from mars_cli.errors import MarsError
from mars_cli.main import app
from mars_cli.tools import crop
from mars_cli.tools.crop import box_to_pixels, check_box, compose_box, covered_box, crop_image, output_size

runner = CliRunner()


def pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def plain_errors(monkeypatch):
    # Under CliRunner typer draws errors in a rich box; the real entry (`mars_cli.main.run`)
    # prints them plainly as `mars crop: …`, which is what these tests check.
    import typer.core

    monkeypatch.setattr(typer.core, "HAS_RICH", False)


@pytest.fixture(autouse=True)
def fresh_cache():
    images.clear_cache()
    yield
    images.clear_cache()


@pytest.fixture
def png(tmp_path) -> tuple[Path, np.ndarray]:
    arr = pattern(200, 100)
    path = tmp_path / "src.png"
    Image.fromarray(arr).save(path)
    return path, arr


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def mars(*args, env=None):
    return runner.invoke(app, ["crop", *map(str, args)], env=env)


# -- pixel mapping, by hand ------------------------------------------------------------------


@pytest.mark.parametrize(
    "box,w,h,expected",
    [
        ((0, 0, 1, 1), 200, 100, (0, 0, 200, 100)),
        ((0.3, 0.2, 0.6, 0.7), 1000, 500, (300, 100, 600, 350)),  # 0.3*1000 is 300.00000000000006
        ((0.25, 0.25, 0.5, 0.5), 4, 4, (1, 1, 2, 2)),  # edges exactly on pixel borders
        ((0.1234, 0.5, 0.5678, 0.75), 100, 10, (12, 5, 57, 8)),  # floor left/top, ceil right/bottom
        ((0.5, 0.5, 0.501, 0.501), 100, 100, (50, 50, 51, 51)),  # one pixel
        ((0.505, 0.1, 0.507, 0.2), 100, 10, (50, 1, 51, 2)),  # inside one pixel: that pixel
        ((0.999999999, 0.0, 1.0, 1e-9), 10, 10, (9, 0, 10, 1)),  # slivers at the far edges
        ((0.1, 0.1, 0.3, 0.3), 3, 3, (0, 0, 1, 1)),
        ((0.7, 0.0, 0.9, 0.5), 7, 3, (4, 0, 7, 2)),  # 4.9 -> 4, 6.3 -> 7, 1.5 -> 2
    ],
)
def test_box_to_pixels(box, w, h, expected):
    assert box_to_pixels(check_box(box), w, h) == expected


def test_check_box_errors_and_clamp():
    with pytest.raises(MarsError, match=r"x0=1\.2 is outside \[0, 1\] \(use --clamp"):
        check_box((1.2, 0, 1.5, 1))
    with pytest.raises(MarsError, match="x0 must be less than x1"):
        check_box((0.5, 0, 0.5, 1))
    with pytest.raises(MarsError, match="y0 must be less than y1"):
        check_box((0, 0.7, 1, 0.2))
    with pytest.raises(MarsError, match="not a finite number"):
        check_box((0, float("nan"), 1, 1))
    with pytest.raises(MarsError, match="four numbers"):
        check_box((0, 0, 1))
    assert check_box((-0.1, 0.2, 1.3, 0.8), clamp=True) == (0.0, 0.2, 1.0, 0.8)
    assert check_box((0.6, 0.9, 0.2, 0.1), clamp=True) == (0.2, 0.1, 0.6, 0.9)
    with pytest.raises(MarsError, match="no area inside the image"):
        check_box((1.2, 0, 1.5, 1), clamp=True)


def test_output_size_keeps_aspect():
    assert output_size(10, 5) == (56, 28)  # the reference code would make it 28x28
    assert output_size(3, 1) == (84, 28)
    assert output_size(40, 30) == (40, 30)
    assert output_size(10, 5, min_side=0) == (10, 5)
    assert output_size(1000, 600, max_pixels=100_000) == (392, 224)
    assert output_size(10, 5, min_pixels=28 * 28 * 4) == (84, 56)


# -- the crop itself ---------------------------------------------------------------------------


def test_crop_pixels_are_the_source_pixels(png, tmp_path):
    path, arr = png
    r = crop_image(path, (0.1234, 0.25, 0.5678, 0.75), out=tmp_path / "c.png", min_side=0)
    assert r["box_px"] == [24, 25, 114, 75] and r["size"] == [90, 50] and r["image_size"] == [200, 100]
    assert np.array_equal(read(r["path"]), arr[25:75, 24:114])
    assert r["source"] == str(path) and r["box"] == [0.1234, 0.25, 0.5678, 0.75]


def test_tiny_box_is_upscaled_keeping_aspect(png, tmp_path):
    path, arr = png
    r = crop_image(path, (0.5, 0.5, 0.52, 0.53), out=tmp_path / "c.png")  # 4x3 pixels
    assert r["box_px"] == [100, 50, 104, 53] and r["size"] == [37, 28]
    big = read(r["path"])
    assert big.shape == (28, 37, 3)
    # Upscaling keeps the picture: shrinking it back is close to the original 4x3 pixels.
    back = np.asarray(Image.fromarray(big).resize((4, 3), Image.Resampling.BOX)).astype(int)
    assert np.abs(back - arr[50:53, 100:104]).mean() < 40


def test_smart_resize_flags(png, tmp_path):
    path, _ = png
    r = crop_image(path, (0, 0, 1, 1), out=tmp_path / "c.png", max_pixels=28 * 28 * 4)
    assert r["size"] == [56, 28]  # 200x100 -> 196x112 rounded, over 3136: shrunk to 56x28
    assert read(r["path"]).shape == (28, 56, 3)


def test_crop_follows_exif_orientation(tmp_path):
    arr = pattern(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait (rotated 90° clockwise)
    Image.fromarray(arr).save(tmp_path / "r.png", exif=exif.tobytes())
    shown = np.rot90(arr, -1)
    r = crop_image(tmp_path / "r.png", (0, 0, 0.5, 0.25), out=tmp_path / "c.png", min_side=0)
    assert r["image_size"] == [40, 60] and r["box_px"] == [0, 0, 20, 15]
    assert np.array_equal(read(r["path"]), shown[0:15, 0:20])


def test_compose_box_equals_cropping_twice(png, tmp_path):
    path, arr = png
    rng = random.Random(7)
    for i in range(25):
        x0, x1 = sorted(rng.uniform(0, 1) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, 1) for _ in range(2))
        if x1 - x0 < 0.05 or y1 - y0 < 0.05:
            continue
        parent = crop_image(path, (x0, y0, x1, y1), out=tmp_path / "p.png", min_side=0)
        child = (rng.uniform(0, 0.5), rng.uniform(0, 0.5), rng.uniform(0.5, 1), rng.uniform(0.5, 1))
        twice = crop_image(parent["path"], child, out=tmp_path / "twice.png", min_side=0)
        direct = crop_image(path, compose_box(covered_box(parent), child), out=tmp_path / "direct.png", min_side=0)
        assert np.array_equal(read(twice["path"]), read(direct["path"])), (parent["box"], child)
    assert compose_box((0.2, 0.2, 0.6, 1.0), (0.5, 0.0, 1.0, 0.5)) == pytest.approx((0.4, 0.2, 0.6, 0.6))


def test_content_hash_names_and_env_default(png, tmp_path, monkeypatch):
    path, _ = png
    a = crop_image(path, (0, 0, 0.5, 0.5), out_dir=tmp_path / "art")
    b = crop_image(path, (0, 0, 0.5, 0.5), out_dir=tmp_path / "art")
    c = crop_image(path, (0.5, 0, 1, 0.5), out_dir=tmp_path / "art", fmt="png")
    assert a["path"] == b["path"] and a["path"].endswith(".jpg") and c["path"].endswith(".png")
    assert Path(a["path"]).name[:32] == __import__("hashlib").sha256(Path(a["path"]).read_bytes()).hexdigest()[:32]
    monkeypatch.setenv("MARS_ARTIFACTS", str(tmp_path / "env-art"))
    d = crop_image(path, (0, 0, 0.5, 0.5))
    assert Path(d["path"]).parent == tmp_path / "env-art"


def test_repeated_crops_decode_once(tmp_path):
    Image.fromarray(pattern(300, 200)).save(tmp_path / "a.jpg", quality=90)
    for i in range(5):
        crop_image(tmp_path / "a.jpg", (i / 10, 0.1, i / 10 + 0.3, 0.6), out_dir=tmp_path)
    assert images.cache_info()["decodes"] == 1 and images.cache_info()["hits"] == 4


def test_failed_write_leaves_nothing(png, tmp_path, monkeypatch):
    path, _ = png
    out = tmp_path / "out.jpg"
    out.write_bytes(b"previous")

    def broken(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])
        raise OSError(28, "no space left on device")

    monkeypatch.setattr(Path, "write_bytes", broken)
    from mars_cli.errors import MarsError

    with pytest.raises(MarsError, match="out.jpg: no space left on device"):
        crop_image(path, (0, 0, 1, 1), out=out)
    monkeypatch.undo()
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jpg", "src.png"]


# -- the command -----------------------------------------------------------------------------


def test_cli_prints_one_record(png, tmp_path):
    path, arr = png
    result = mars(path, 0.25, 0.5, 0.75, 1, "-o", tmp_path / "c.png")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    rec = orjson.loads(lines[0])
    assert rec["box_px"] == [50, 50, 150, 100] and rec["size"] == [100, 50] and rec["path"] == str(tmp_path / "c.png")
    assert rec["schema_version"] >= 1 and rec["source"] == str(path)
    assert np.array_equal(read(tmp_path / "c.png"), arr[50:100, 50:150])


@pytest.mark.parametrize("ext,fmt", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".png", "PNG"), (".webp", "WEBP"), (".tif", "TIFF")])
def test_cli_format_from_extension(png, tmp_path, ext, fmt):
    path, _ = png
    result = mars(path, 0, 0, 0.5, 0.5, "-o", tmp_path / f"c{ext}")
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / f"c{ext}").format == fmt


def test_cli_quality_flag(tmp_path):
    Image.fromarray(pattern(200, 200)).save(tmp_path / "a.png")
    sizes = []
    for q in (30, 95):
        r = mars(tmp_path / "a.png", 0, 0, 1, 1, "--quality", q, "-o", tmp_path / f"q{q}.jpg")
        assert r.exit_code == 0, r.stderr
        sizes.append((tmp_path / f"q{q}.jpg").stat().st_size)
    assert sizes[0] < sizes[1] * 0.7
    assert mars(tmp_path / "a.png", 0, 0, 1, 1, "--quality", 0).exit_code == 2


def test_cli_out_dir_env_and_o_override(png, tmp_path):
    path, _ = png
    r = mars(path, 0, 0, 0.5, 0.5, env={"MARS_ARTIFACTS": str(tmp_path / "art")})
    assert r.exit_code == 0, r.stderr
    assert Path(json.loads(r.stdout)["path"]).parent == tmp_path / "art"
    r = mars(path, 0, 0, 0.5, 0.5, "-o", tmp_path / "x.png", env={"MARS_ARTIFACTS": str(tmp_path / "art")})
    assert r.exit_code == 0 and json.loads(r.stdout)["path"] == str(tmp_path / "x.png")
    r = mars(path, 0, 0, 0.5, 0.5, "-o", tmp_path / "x.png", "--artifacts", tmp_path)
    assert r.exit_code == 2 and "not both" in r.stderr


def test_cli_clamp_and_negative_numbers(png, tmp_path):
    path, _ = png
    r = mars("--clamp", "-o", tmp_path / "c.png", path, "--", -0.2, 0.5, 1.4, 2)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["box_px"] == [0, 50, 200, 100]


def make_bad(tmp_path, kind: str) -> Path:
    if kind == "non-image":
        p = tmp_path / "notes.jpg"
        p.write_text("just text\n")
    elif kind == "truncated":
        p = tmp_path / "cut.jpg"
        Image.fromarray(pattern(300, 200)).save(p, quality=90)
        p.write_bytes(p.read_bytes()[:8000])
    elif kind == "missing":
        p = tmp_path / "missing.png"
    else:
        p = tmp_path / "big.png"
        Image.fromarray(pattern(100, 100)).save(p)
    return p


@pytest.mark.parametrize(
    "kind,extra,message",
    [
        ("non-image", [], "not an image"),
        ("truncated", [], "truncated or corrupt JPEG"),
        ("missing", [], "no such file"),
        ("bomb", ["--max-image-pixels", "9999"], "over the limit"),
    ],
)
def test_cli_bad_images(tmp_path, kind, extra, message):
    p = make_bad(tmp_path, kind)
    r = mars(p, 0, 0, 1, 1, "-o", tmp_path / "out.jpg", *extra)
    assert r.exit_code == 1
    assert r.stdout == ""
    assert r.stderr.startswith(f"mars crop: {p}: "), r.stderr
    assert message in r.stderr
    assert not (tmp_path / "out.jpg").exists()


@pytest.mark.parametrize("var, value, need", [
    ("MARS_MAX_IMAGE_PIXELS", "-5", "at least 1"), ("MARS_MAX_IMAGE_PIXELS", "lots", "valid integer"),
    ("MARS_MAX_IMAGE_BYTES", "-5", "an integer >= 1"), ("MARS_MAX_IMAGE_BYTES", "lots", "an integer >= 1"),
    ("MARS_MAX_IMAGE_BYTES", "0", "an integer >= 1"), ("MARS_IMAGE_CACHE_PIXELS", "-1", "an integer >= 0"),
    ("MARS_IMAGE_CACHE_PIXELS", "1.5", "an integer >= 0")])
def test_minor_bad_mars_number_variable_is_a_usage_error(tmp_path, var, value, need):
    """Every MARS_* number is checked one way (settings.env_number, or click for a flag's own
    variable): a negative, zero or non-number limit is a usage error naming the variable."""
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.jpg")
    r = mars(tmp_path / "a.jpg", 0, 0, 1, 1, "-o", tmp_path / "o.jpg", env={var: value})
    assert r.exit_code == 2 and var in r.stderr and need in r.stderr, r.stderr
    assert not (tmp_path / "o.jpg").exists()


def test_cli_bomb_limit_from_env(tmp_path):
    p = make_bad(tmp_path, "bomb")
    r = mars(p, 0, 0, 1, 1, "-o", tmp_path / "o.jpg", env={"MARS_MAX_IMAGE_PIXELS": "5000"})
    assert r.exit_code == 1 and "over the limit of 5000 pixels" in r.stderr
    r = mars(p, 0, 0, 1, 1, "-o", tmp_path / "o.jpg", "--max-image-pixels", "10000", env={"MARS_MAX_IMAGE_PIXELS": "5000"})
    assert r.exit_code == 0, r.stderr  # the flag wins over the environment


@pytest.mark.parametrize(
    "box,message",
    [((0.6, 0, 0.2, 1), "x0 must be less than x1"), ((0, 0, 1.5, 1), "x1=1.5 is outside [0, 1]"), ((0, 0.5, 1, 0.5), "y0 must be less than y1"),
     ((100, 100, 500, 500), "a 0-1000 box? pass --units 1000")],
)
def test_cli_bad_boxes(png, tmp_path, box, message):
    """A bad box on the command line is a usage error (exit 2); in batch records it is bad data (exit 1)."""
    path, _ = png
    r = mars(path, *box, "-o", tmp_path / "c.png")
    assert r.exit_code == 2 and r.stderr.startswith("mars crop: box ") and message in r.stderr
    assert not (tmp_path / "c.png").exists()


def test_cli_bad_outputs_and_usage(png, tmp_path):
    path, _ = png
    r = mars(path, 0, 0, 1, 1, "-o", tmp_path / "c.xyz")
    assert r.exit_code == 1 and "unknown image extension" in r.stderr
    r = mars(path, 0, 0, 1, 1, "-o", tmp_path / "nodir" / "c.png")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    assert mars(path, 0, 0, 1).exit_code == 2
    assert mars(path, 0, "zero", 1, 1).exit_code == 2


def test_crop_module_has_no_heavy_imports():
    assert "torch" not in crop.__dict__ and "transformers" not in images.__dict__


def test_real_entry_prints_plain_error(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "mars_cli", "crop", str(tmp_path / "nope.png"), "0", "0", "1", "1"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == f"mars crop: {tmp_path / 'nope.png'}: no such file\n"


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.integers(1, 9000), st.integers(1, 9000))
def test_box_to_pixels_covers_the_box_minimally(a, b, c, d, w, h):
    x0, x1 = sorted((a, b))
    y0, y1 = sorted((c, d))
    if x0 == x1 or y0 == y1:
        return
    left, top, right, bottom = box_to_pixels(check_box((x0, y0, x1, y1)), w, h)
    for lo, hi, lo_px, hi_px, n in ((x0, x1, left, right, w), (y0, y1, top, bottom, h)):
        assert 0 <= lo_px < hi_px <= n
        eps = 1e-6 / n
        if hi_px - lo_px > 1:  # a single pixel may stand in for a box thinner than one
            assert lo_px / n <= lo + eps and hi_px / n >= hi - eps  # covers the box
            assert (lo_px + 1) / n > lo - eps and (hi_px - 1) / n < hi + eps  # and no more


def test_concurrent_crops_share_one_decode(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    Image.fromarray(pattern(400, 300)).save(tmp_path / "a.jpg", quality=90)
    boxes = [(i / 40, i / 50, 0.5 + i / 40, 0.5 + i / 50) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: crop_image(tmp_path / "a.jpg", b, out_dir=tmp_path / "art"), boxes))
    assert images.cache_info()["decodes"] == 1
    assert len({r["path"] for r in results}) == 16
    assert not [p for p in (tmp_path / "art").iterdir() if p.name.startswith(".")]  # no temp files left


def test_output_file_mode_follows_umask(png, tmp_path):
    path, _ = png
    old = os.umask(0o022)
    try:
        r = crop_image(path, (0, 0, 1, 1), out=tmp_path / "c.jpg")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(r["path"]).st_mode) == 0o644
