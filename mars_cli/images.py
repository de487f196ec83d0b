"""Decoding images safely and fast, with a small shared cache of decoded pixels.

Every image mars looks at (task images, crops, thumbnails) goes through `load_array` /
`load_image`, so the rules live in one place:

- the result is always 8-bit RGB as displayed: EXIF orientation applied, CMYK and 16-bit
  converted, transparency composited on white (a black background would hide dark text).
  A protocol profile may ask for the other decode mode, "stored" (`set_decode_mode`, or
  `decode=` per call): the pixels as stored, no EXIF rotation, any other mode turned
  into RGB by Pillow's convert("RGB") (alpha dropped), as the official evaluation reads
  images (inference/eval.py:1418-1421). The mode is part of the cache key;
- JPEGs in YCbCr or grey are decoded by libjpeg-turbo through simplejpeg (1.5-2× faster
  than Pillow on a 4K photo), everything else (PNG, WebP, TIFF, GIF, CMYK JPEG) by Pillow;
- only regular files are opened (a device or FIFO is refused before any read), at most
  MARS_MAX_IMAGE_BYTES (default 1 GiB) of them;
- a non-image, a truncated file or an image over the pixel limit (a decompression bomb)
  is refused with a MarsError naming the file; the limit is `max_image_pixels`, else
  MARS_MAX_IMAGE_PIXELS, else 200 MP, and it is checked from the header before decoding
  (Pillow's own, lower, bomb limit is raised to it);
- `thumbnail_jpeg` (judge images, show --embed) and `read_image_file` (images sent to an
  API as they are) follow the same rules;
- decoded pixels are kept in an LRU cache keyed on (path, inode, size, mtime), bounded by
  total pixels (MARS_IMAGE_CACHE_PIXELS, default 150 MP ≈ 450 MB), so the ten crops an
  episode takes of one 4K image decode it once. Cached arrays are shared and read-only;
- decodes running at once, in every thread of the process, share a pixel budget
  (MARS_DECODE_PIXELS, default 400 MP): many large images decode in turn, not together.
"""

from __future__ import annotations

import io
import math
import os
import stat
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mars_cli.errors import MarsError
from mars_cli.imagecache import PixelLRU
from mars_cli.settings import env_number

DEFAULT_MAX_IMAGE_PIXELS = 200_000_000
DEFAULT_CACHE_PIXELS = 150_000_000
DEFAULT_MAX_IMAGE_BYTES = 1 << 30
DEFAULT_DECODE_PIXELS = 400_000_000  # decoded at once, all threads: two images at the 200 MP limit
JPEG_MAGIC = b"\xff\xd8\xff"
# Output formats by file extension (what `mars crop -o NAME.EXT` writes).
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}

# We check the pixel count ourselves (from the header, with our own limit and message).
# Pillow's built-in check would refuse at 2× its 89 MP default, below our 200 MP, so it is
# raised to at least our limit; its warning between 1× and 2× is noise for us.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def pixel_limit(value: int | None = None) -> int:
    """The decompression-bomb limit: `value`, else MARS_MAX_IMAGE_PIXELS, else 200 MP."""
    if value is not None:
        if value <= 0:
            raise MarsError(f"the image pixel limit must be positive, got {value}")
        return int(value)
    return env_number("MARS_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)


_cache = PixelLRU(DEFAULT_CACHE_PIXELS)
_budget_env = [None]  # the MARS_IMAGE_CACHE_PIXELS text last applied (read at decode time, not at import)


def _cache_budget_from_env() -> None:
    raw = os.environ.get("MARS_IMAGE_CACHE_PIXELS")
    if raw != _budget_env[0]:
        set_cache_budget(env_number("MARS_IMAGE_CACHE_PIXELS", DEFAULT_CACHE_PIXELS, minimum=0))
        _budget_env[0] = raw


DECODE_MODES = ("display", "stored")
_decode_mode = "display"


def set_decode_mode(mode: str) -> None:
    """How this process decodes images from now on: "display" (default) or "stored".

    A command sets it once from its protocol profile (protocol.Profile.decode), so every
    reader (crops, engines, the judge's image) sees the image the same way.
    """
    global _decode_mode
    if mode not in DECODE_MODES:
        raise MarsError(f"unknown image decode mode {mode!r} (choose {', '.join(DECODE_MODES)})")
    _decode_mode = mode


def decode_mode() -> str:
    """The process's decode mode ("display" unless a profile set "stored")."""
    return _decode_mode


def _mode(decode: str | None) -> str:
    if decode is None:
        return _decode_mode
    if decode not in DECODE_MODES:
        raise MarsError(f"unknown image decode mode {decode!r} (choose {', '.join(DECODE_MODES)})")
    return decode


def cache_info() -> dict:
    """Counters of the decoded-image cache: hits, misses, decodes, entries, pixels, budget."""
    return _cache.info()


def clear_cache() -> None:
    """Forget every decoded image (and reset the counters)."""
    _cache.clear()


def set_cache_budget(pixels: int) -> None:
    """Bound the cache to `pixels` decoded pixels in total (0 disables caching)."""
    with _cache._lock:
        _cache.budget = max(0, int(pixels))
        while _cache._pixels > _cache.budget and _cache._items:
            _cache._drop(next(iter(_cache._items)))


def _local_path(src: str | os.PathLike) -> Path:
    s = os.fspath(src)
    if s.startswith("file:"):
        from urllib.parse import unquote, urlsplit

        u = urlsplit(s)
        if u.netloc not in ("", "localhost") or not u.path:
            raise MarsError(f"{s}: a file URL needs an absolute path (file:///dir/image.jpg)")
        return Path(unquote(u.path))
    if "://" in s:
        raise MarsError(f"{s}: only local image files can be opened (download URLs first)")
    return Path(s)


def max_image_bytes() -> int:
    """The largest image file read: MARS_MAX_IMAGE_BYTES, else 1 GiB."""
    return env_number("MARS_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES)


def _stat_key(path: Path) -> tuple:
    """The cache key of a readable regular file within the size bound (else a MarsError).

    Checked before any open(): a FIFO would block and /dev/zero would never end.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MarsError(f"{path}: no such file") from None
    except PermissionError:
        raise MarsError(f"{path}: permission denied") from None
    except OSError as e:
        raise MarsError(f"{path}: cannot read ({(e.strerror or str(e)).lower()})") from None
    if stat.S_ISDIR(st.st_mode):
        raise MarsError(f"{path}: is a directory, expected an image")
    if not stat.S_ISREG(st.st_mode):
        raise MarsError(f"{path}: not a regular file")
    limit = max_image_bytes()
    if st.st_size > limit:
        raise MarsError(f"{path}: {st.st_size} bytes, over the image file limit of {limit} (MARS_MAX_IMAGE_BYTES)")
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


def load_array(src: str | os.PathLike, *, max_image_pixels: int | None = None, decode: str | None = None) -> np.ndarray:
    """The image as an (H, W, 3) uint8 RGB array, as displayed (or as stored, by the
    decode mode); shared and read-only.

    Decoded once per file version and kept in the cache; do not write to the result
    (numpy refuses: the array is flagged read-only). Copy it if you need to.
    """
    path = _local_path(src)
    limit = pixel_limit(max_image_pixels)
    mode = _mode(decode)
    key = _stat_key(path) + (mode,)
    _cache_budget_from_env()
    arr = _cache.get(key, lambda: _decode_file(path, limit, mode))
    # A cached image was checked against the limit it was decoded under; check this one's.
    _check_pixels(path, arr.shape[1], arr.shape[0], limit)
    return arr


def load_image(
    src: str | os.PathLike, *, max_pixels: int | None = None, max_image_pixels: int | None = None
) -> Image.Image:
    """The image as a new RGB PIL image, as displayed (EXIF orientation applied).

    `max_pixels` shrinks it, keeping the aspect ratio, to at most that many pixels (for a
    model input or a preview); `max_image_pixels` is the decompression-bomb limit.
    """
    arr = load_array(src, max_image_pixels=max_image_pixels)
    img = Image.fromarray(arr)
    h, w = arr.shape[:2]
    if max_pixels is not None and w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        size = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img


def image_size(src: str | os.PathLike, *, max_image_pixels: int | None = None,
               decode: str | None = None) -> tuple[int, int]:
    """(width, height) as displayed (or stored), from the cache or the file header (no decode)."""
    path = _local_path(src)
    mode = _mode(decode)
    key = _stat_key(path) + (mode,)
    with _cache._lock:
        arr = _cache._items.get(key)
    if arr is not None:
        return arr.shape[1], arr.shape[0]
    data = _read(path)
    with _open_pillow(path, data, pixel_limit(max_image_pixels)) as im:
        w, h = im.size
        if mode == "display" and _orientation(im) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


def _read(path: Path) -> bytes:
    """The bytes of an image file: a regular file, at most max_image_bytes() long."""
    _stat_key(path)
    limit = max_image_bytes()
    try:
        with open(path, "rb") as f:
            data = _read_bounded(f, limit)
    except FileNotFoundError:
        raise MarsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MarsError(f"{path}: is a directory, expected an image") from None
    except PermissionError:
        raise MarsError(f"{path}: permission denied") from None
    except OSError as e:
        raise MarsError(f"{path}: cannot read ({(e.strerror or str(e)).lower()})") from None
    if len(data) > limit:
        raise MarsError(f"{path}: over the image file limit of {limit} bytes (MARS_MAX_IMAGE_BYTES)")
    if not data:
        raise MarsError(f"{path}: empty file, not an image")
    return data


def _read_bounded(f, limit: int) -> bytes:
    """At most limit + 1 bytes of an open file, in a buffer sized by the file, not the bound.

    `f.read(limit + 1)` would allocate the whole bound (1 GiB by default) for every image:
    slower by a page-table round trip, and a MemoryError under a virtual-memory limit
    (`ulimit -v`, as batch schedulers set it). A file that grows after the size check is
    read on in blocks, still bounded.
    """
    size = os.fstat(f.fileno()).st_size
    data = f.read(min(size, limit) + 1)
    if len(data) <= min(size, limit):
        return data
    blocks = [data]
    total = len(data)
    while total <= limit and (block := f.read(min(1 << 20, limit + 1 - total))):
        blocks.append(block)
        total += len(block)
    return b"".join(blocks)


def read_image_file(src: str | os.PathLike, *, max_image_pixels: int | None = None) -> tuple[bytes, str]:
    """(bytes, MIME type) of an image file, checked to be an image under the pixel limit
    from its header. For sending a file as it is (an API request): never any other file."""
    path = _local_path(src)
    data = _read(path)
    with _open_pillow(path, data, pixel_limit(max_image_pixels)) as im:
        fmt = im.format or "JPEG"
    return data, Image.MIME.get(fmt, "image/" + fmt.lower())


def thumbnail_jpeg(src: str | os.PathLike, side: int, *, quality: int = 85,
                   max_image_pixels: int | None = None) -> bytes:
    """A JPEG of the image as displayed, its long side at most `side` pixels.

    Under mars's pixel limit (not Pillow's), and a large JPEG is decoded at a reduced
    scale (Pillow's draft mode) rather than at full size, so a 196 MP photo costs little.
    """
    path = _local_path(src)
    data = _read(path)
    with _open_pillow(path, data, pixel_limit(max_image_pixels)) as im:
        try:
            if im.format == "JPEG":
                im.draft("RGB", (side, side))
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
            rgb.thumbnail((side, side))
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise MarsError(f"{path}: truncated or corrupt image ({str(e).strip().lower()})") from None
    return encode(np.asarray(rgb, dtype=np.uint8), "JPEG", quality=quality)


def _amount(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def _check_pixels(path: Path, w: int, h: int, limit: int) -> None:
    if w * h > limit:
        raise MarsError(
            f"{path}: image is {w}x{h} = {_amount(w * h)}, over the limit of {_amount(limit)} "
            "(a decompression bomb?); raise --max-image-pixels or MARS_MAX_IMAGE_PIXELS to allow it"
        )


def _open_pillow(path: Path, data: bytes, limit: int) -> Image.Image:
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise MarsError(f"{path}: not an image (unrecognized format)") from None
    except Image.DecompressionBombError as e:
        raise MarsError(f"{path}: refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MarsError(f"{path}: corrupt image header: {e}") from None
    _check_pixels(path, im.size[0], im.size[1], limit)
    return im


class _DecodeBudget:
    """The pixels being decoded at once by every thread of the process (`mars serve`'s
    request checks, a rollout's tools, a trainer's prefetch): a decode waits while the
    others hold MARS_DECODE_PIXELS (400 MP), and runs when it is alone, however large
    (it passed the per-image limit). A decode holds several bytes a pixel at its peak, so
    this bounds the memory many large images take together, not their number."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.held = 0

    @contextmanager
    def hold(self, pixels: int):
        budget = env_number("MARS_DECODE_PIXELS", DEFAULT_DECODE_PIXELS)
        with self._cond:
            while self.held and self.held + pixels > budget:
                self._cond.wait()
            self.held += pixels
        try:
            yield
        finally:
            with self._cond:
                self.held -= pixels
                self._cond.notify_all()


_decoding = _DecodeBudget()


def _header_pixels(data: bytes) -> int:
    """The pixel count an image's header gives (0 when unreadable: its decode says why)."""
    try:
        if data.startswith(JPEG_MAGIC):
            import simplejpeg

            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(h) * int(w)
        with Image.open(io.BytesIO(data)) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:  # noqa: BLE001 — any header Pillow cannot read
        return 0


def _decode_file(path: Path, limit: int, mode: str = "display") -> np.ndarray:
    data = _read(path)
    with _decoding.hold(min(_header_pixels(data), limit)):
        if mode == "stored":
            arr = _decode_stored(path, data, limit)
        else:
            arr = _decode_jpeg_fast(path, data, limit) if data.startswith(JPEG_MAGIC) else None
            if arr is None:
                arr = _decode_pillow(path, data, limit)
    arr.flags.writeable = False
    return arr


def _decode_jpeg_fast(path: Path, data: bytes, limit: int) -> np.ndarray | None:
    """simplejpeg for YCbCr/grey JPEGs; None means "let Pillow do it" (CMYK, odd files)."""
    import simplejpeg

    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # Pillow gives the better message for a broken header
    _check_pixels(path, w, h, limit)
    if colorspace not in ("YCbCr", "Gray"):
        return None
    with _open_pillow(path, data, limit) as im:
        orientation = _orientation(im)
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as e:
        raise MarsError(f"{path}: truncated or corrupt JPEG ({str(e).strip().lower()})") from None
    return _orient(arr, orientation)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored); a broken EXIF block counts as 1."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # EXIF parsers raise all sorts on damaged metadata; pixels still decode
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1–8) to an (H, W, C) array, as Pillow's exif_transpose does."""
    if orientation == 2:
        arr = arr[:, ::-1]
    elif orientation == 3:
        arr = arr[::-1, ::-1]
    elif orientation == 4:
        arr = arr[::-1]
    elif orientation == 5:
        arr = arr.transpose(1, 0, 2)
    elif orientation == 6:
        arr = np.rot90(arr, -1)
    elif orientation == 7:
        arr = arr.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        arr = np.rot90(arr, 1)
    else:
        return arr
    return np.ascontiguousarray(arr)


def _decode_pillow(path: Path, data: bytes, limit: int) -> np.ndarray:
    with _open_pillow(path, data, limit) as im:
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
            return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
        except MarsError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise MarsError(f"{path}: truncated or corrupt image ({str(e).strip().lower()})") from None


def _decode_stored(path: Path, data: bytes, limit: int) -> np.ndarray:
    """The pixels as stored: Pillow's decoder, no EXIF rotation, convert("RGB") for any
    other mode (alpha dropped, not composited)."""
    with _open_pillow(path, data, limit) as im:
        try:
            im.load()
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise MarsError(f"{path}: truncated or corrupt image ({str(e).strip().lower()})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; alpha is composited on white."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" not in im.info:
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa", "P") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (PNG/TIFF): keep the top 8 bits instead of clipping everything above 255.
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        top = a.max() if a.size and a.max() > 255 else 255.0
        return Image.fromarray(np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the area in [min_pixels, max_pixels].

    The Qwen-VL rule: round each side to the nearest multiple of the patch factor, then
    scale both sides by one factor (keeping the aspect ratio) when the area falls outside
    the bounds, rounding down when shrinking and up when growing.
    """
    if height <= 0 or width <= 0:
        raise MarsError(f"cannot resize an empty image ({width}x{height})")
    if min_pixels > max_pixels:
        raise MarsError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    if max(height, width) / min(height, width) > 200:
        raise MarsError(f"aspect ratio of {width}x{height} is over 200, too extreme to resize")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def encode(arr: np.ndarray, fmt: str, *, quality: int = 90) -> bytes:
    """An (H, W, 3) uint8 RGB array as file bytes in `fmt` (JPEG via libjpeg-turbo)."""
    fmt = fmt.upper()
    if fmt == "JPEG":
        import simplejpeg

        # 4:2:0 like Pillow's default: text stays sharp (it lives in luma) and files are smaller.
        return simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=quality, colorspace="RGB",
                                      colorsubsampling="420")
    buf = io.BytesIO()
    opts = {"quality": quality} if fmt == "WEBP" else {}
    if fmt == "PNG":
        opts["compress_level"] = 1  # crops are transient artifacts: speed over a few % of size
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, fmt, **opts)
    return buf.getvalue()


def format_for(path: str | os.PathLike) -> str:
    """The output format for a file name, from its extension."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise MarsError(f"{path}: unknown image extension {ext or '(none)'!r}; use one of {known}")
    return FORMATS[ext]
