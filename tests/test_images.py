"""mars_cli.images: decoding (formats, modes, EXIF), refusals, the pixel cache, smart_resize."""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from mars_cli import images
from mars_cli.errors import MarsError


def pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    """An asymmetric RGB test picture: gradients plus noise, so flips and rotations show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * 3 + yy * 7) % 256], -1)
    arr = arr + rng.integers(0, 30, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def save(arr_or_img, path, **kw):
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, **kw)
    return path


@pytest.fixture(autouse=True)
def fresh_cache():
    images.clear_cache()
    yield
    images.clear_cache()


@pytest.mark.parametrize("ext,kw", [(".png", {}), (".webp", {"lossless": True}), (".tif", {}), (".bmp", {}), (".gif", {})])
def test_lossless_formats_decode_exactly(tmp_path, ext, kw):
    arr = pattern(40, 30)
    if ext == ".gif":  # GIF holds a palette: compare with Pillow's own palette conversion
        img = Image.fromarray(arr).quantize(64)
        save(img, tmp_path / "a.gif")
        expected = np.asarray(Image.open(tmp_path / "a.gif").convert("RGB"))
    else:
        save(arr, tmp_path / f"a{ext}", **kw)
        expected = arr
    got = images.load_array(tmp_path / f"a{ext}")
    assert got.dtype == np.uint8 and got.shape == (30, 40, 3)
    assert np.array_equal(got, expected)


def test_jpeg_fast_path_matches_pillow(tmp_path):
    save(pattern(64, 48), tmp_path / "a.jpg", quality=90)
    got = images.load_array(tmp_path / "a.jpg")
    ref = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")).astype(int)
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref).max() <= 2


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_exif_orientation_applied_like_pillow(tmp_path, orientation, ext):
    img = Image.fromarray(pattern(48, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}{ext}"
    img.save(path, exif=exif.tobytes(), **({"quality": 95} if ext == ".jpg" else {}))
    ref = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")).astype(int)
    got = images.load_array(path)
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref).max() <= (2 if ext == ".jpg" else 0)
    w, h = images.image_size(path)
    assert (h, w) == got.shape[:2]
    images.clear_cache()
    assert images.image_size(path) == (w, h)  # from the header, without decoding


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red channel under full transparency must not show
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (0, 0, 0, 128)
    save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
    got = images.load_array(tmp_path / "a.png")
    assert tuple(got[1, 1]) == (255, 255, 255)
    assert tuple(got[0, 0]) == (10, 20, 30)
    assert all(abs(int(v) - 127) <= 1 for v in got[0, 1])  # half black over white


def test_palette_with_transparency_and_la(tmp_path):
    p = Image.new("P", (3, 3), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)
    got = images.load_array(tmp_path / "p.png")
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[1, 1]) == (255, 0, 0)
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")
    save(la, tmp_path / "la.png")
    got = images.load_array(tmp_path / "la.png")
    assert tuple(got[0, 0]) == (50, 50, 50) and tuple(got[0, 1]) == (255, 255, 255)


@pytest.mark.parametrize("ext", [".jpg", ".tif"])
def test_cmyk_becomes_rgb(tmp_path, ext):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = (255, 0, 0)
    arr[:, 4:] = (0, 0, 255)
    save(Image.fromarray(arr).convert("CMYK"), tmp_path / f"c{ext}", **({"quality": 100} if ext == ".jpg" else {}))
    got = images.load_array(tmp_path / f"c{ext}").astype(int)
    assert got.shape == (8, 8, 3)
    assert np.abs(got[2, 1] - (255, 0, 0)).max() <= 12
    assert np.abs(got[2, 6] - (0, 0, 255)).max() <= 12


def test_sixteen_bit_and_grey_modes(tmp_path):
    a16 = np.array([[0, 65535, 32896]], np.uint16)
    save(Image.fromarray(a16), tmp_path / "g16.png")
    got = images.load_array(tmp_path / "g16.png")
    assert [int(v) for v in got[0, :, 0]] == [0, 255, 128]
    save(Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1"), tmp_path / "b.png")
    assert images.load_array(tmp_path / "b.png").tolist() == [[[0, 0, 0], [255, 255, 255]]]
    save(Image.fromarray(np.array([[7, 9]], np.uint8), "L"), tmp_path / "l.jpg", quality=100)
    got = images.load_array(tmp_path / "l.jpg")
    assert got.shape == (1, 2, 3) and abs(int(got[0, 0, 0]) - 7) <= 2


def test_refuses_non_image_empty_missing_dir(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello, not a picture\n")
    with pytest.raises(MarsError, match=r"notes\.jpg: not an image"):
        images.load_array(tmp_path / "notes.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(MarsError, match=r"empty\.png: empty file"):
        images.load_array(tmp_path / "empty.png")
    with pytest.raises(MarsError, match=r"gone\.png: no such file"):
        images.load_array(tmp_path / "gone.png")
    with pytest.raises(MarsError, match="is a directory"):
        images.load_array(tmp_path)
    with pytest.raises(MarsError, match="only local image files"):
        images.load_array("https://example.com/a.jpg")


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_refuses_truncated_files(tmp_path, ext):
    path = save(pattern(200, 150), tmp_path / f"a{ext}", **({"quality": 90} if ext != ".png" else {}))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(MarsError, match=rf"a\{ext}: (truncated|corrupt)"):
        images.load_array(path)


def test_refuses_bomb_from_header_before_decoding(tmp_path):
    path = save(pattern(16, 16), tmp_path / "bomb.jpg")
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5: sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    path.write_bytes(bytes(data))
    t = time.perf_counter()
    with pytest.raises(MarsError, match=r"bomb\.jpg: image is 60000x60000 = 3600\.0 MP, over the limit of 200\.0 MP"):
        images.load_array(path)
    assert time.perf_counter() - t < 1.0  # refused from the header, nothing allocated


def test_pixel_limit_argument_env_and_cache(tmp_path, monkeypatch):
    path = save(pattern(100, 50), tmp_path / "a.png")
    with pytest.raises(MarsError, match="over the limit"):
        images.load_array(path, max_image_pixels=4999)
    assert images.load_array(path, max_image_pixels=5000).shape == (50, 100, 3)
    # Already cached under a larger limit: a smaller one still refuses it.
    monkeypatch.setenv("MARS_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(MarsError, match="over the limit of 1000 pixels"):
        images.load_array(path)
    monkeypatch.setenv("MARS_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(MarsError, match="MARS_MAX_IMAGE_PIXELS must be an integer >= 1, got 'lots'"):
        images.load_array(path)


def test_cache_decodes_once_and_notices_changes(tmp_path):
    path = save(pattern(60, 40), tmp_path / "a.png")
    a = images.load_array(path)
    b = images.load_array(str(path))
    assert a is b
    info = images.cache_info()
    assert (info["decodes"], info["hits"], info["pixels"]) == (1, 1, 2400)
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1  # shared: read-only
    save(pattern(60, 40, seed=1), path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # even on coarse-mtime file systems
    c = images.load_array(path)
    assert images.cache_info()["decodes"] == 2 and not np.array_equal(a, c)
    assert images.cache_info()["entries"] == 1  # the stale version was dropped


def test_cache_is_bounded_by_pixels(tmp_path):
    images.set_cache_budget(3000)
    paths = [save(pattern(40, 25, seed=i), tmp_path / f"{i}.png") for i in range(4)]  # 1000 px each
    for p in paths:
        images.load_array(p)
    info = images.cache_info()
    assert info["entries"] == 3 and info["pixels"] == 3000
    images.load_array(paths[0])  # evicted first (least recently used): decoded again
    assert images.cache_info()["decodes"] == 5
    images.set_cache_budget(500)  # smaller than one image: nothing is kept
    images.load_array(paths[1])
    assert images.cache_info()["entries"] == 0
    images.set_cache_budget(images.DEFAULT_CACHE_PIXELS)


def test_cache_threads_share_one_decode(tmp_path, monkeypatch):
    path = save(pattern(300, 200), tmp_path / "a.png")
    real = images._decode_file

    def slow(*a):
        time.sleep(0.2)
        return real(*a)

    monkeypatch.setattr(images, "_decode_file", slow)
    out = []
    threads = [threading.Thread(target=lambda: out.append(images.load_array(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 8 and all(o is out[0] for o in out)
    assert images.cache_info()["decodes"] == 1


def test_load_image_is_a_fresh_rgb_copy_and_shrinks(tmp_path):
    path = save(pattern(400, 100), tmp_path / "a.png")
    img = images.load_image(path)
    assert img.mode == "RGB" and img.size == (400, 100)
    img.putpixel((0, 0), (1, 2, 3))  # does not touch the cache
    assert tuple(images.load_array(path)[0, 0]) != (1, 2, 3)
    small = images.load_image(path, max_pixels=10000)
    assert small.size == (200, 50)


def test_smart_resize_hand_cases():
    assert images.smart_resize(1000, 1000) == (980, 980)  # 1008² is over 28·28·1280: shrink, floor
    assert images.smart_resize(10, 10) == (56, 56)  # under 56²: grow, ceil
    assert images.smart_resize(100, 300) == (112, 308)  # in bounds: nearest multiples of 28
    assert images.smart_resize(2160, 3840, max_pixels=1_000_000) == (728, 1316)
    with pytest.raises(MarsError, match="aspect ratio"):
        images.smart_resize(10, 2500)
    with pytest.raises(MarsError, match="min_pixels"):
        images.smart_resize(100, 100, min_pixels=5000, max_pixels=4000)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(28 * 28 * 40, 28 * 28 * 4000))
def test_smart_resize_properties(h, w, max_pixels):
    rh, rw = images.smart_resize(h, w, max_pixels=max_pixels, min_pixels=56 * 56) if max(h, w) / min(h, w) <= 200 else (28, 28)
    assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
    if max(h, w) / min(h, w) > 20:
        return  # extreme strips: one side is pinned at one patch, the area bounds give way
    assert rh * rw <= max_pixels
    assert rh * rw >= 56 * 56
    # The aspect ratio survives up to the rounding of each side to a multiple of 28 (a side
    # rounded up to the single-patch minimum can be off by more than that).
    if min(rh, rw) > 28:
        assert abs(rw / rh - w / h) <= (w / h) * (28 / rh + 28 / rw) * 1.01


def test_encode_and_format_for():
    arr = pattern(32, 16)
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "BMP"):
        img = Image.open(io.BytesIO(images.encode(arr, fmt)))
        assert img.format == fmt and img.size == (32, 16)
    assert images.format_for("x/y.JPEG") == "JPEG" and images.format_for("a.webp") == "WEBP"
    with pytest.raises(MarsError, match=r"crop\.xyz: unknown image extension"):
        images.format_for("crop.xyz")


def test_decodes_share_a_pixel_budget_and_a_lone_large_image_still_decodes(tmp_path, monkeypatch):
    """images._decode_file holds each image's header pixels against MARS_DECODE_PIXELS while
    it decodes, in every thread: never more at once, except one image alone."""
    from concurrent.futures import ThreadPoolExecutor

    from mars_cli import images

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (100, 50), (i, 0, 0)).save(p)
        paths.append(p)
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    monkeypatch.setenv("MARS_DECODE_PIXELS", "10000")  # two 5,000-px images at once
    seen, lock = [], threading.Lock()
    real = images._decode_pillow

    def slow(*a, **kw):
        with lock:
            seen.append(images._decoding.held)
        time.sleep(0.1)
        return real(*a, **kw)

    monkeypatch.setattr(images, "_decode_pillow", slow)
    with ThreadPoolExecutor(6) as pool:
        arrs = list(pool.map(lambda p: images.load_array(p), paths))
    assert [a.shape for a in arrs] == [(50, 100, 3)] * 6 and max(seen) == 10000 and images._decoding.held == 0
    seen.clear()
    assert images.load_array(big).shape == (300, 300, 3) and seen == [90000]  # alone: over the budget, it runs
    monkeypatch.setenv("MARS_DECODE_PIXELS", "0")
    with pytest.raises(MarsError, match="MARS_DECODE_PIXELS"):
        images.load_array(tmp_path / "0.png", decode="stored")
