"""Inputs checked before anything heavy loads: an image given as a path or URL, query lines.

`local_image` makes `mars ask IMG` take a URL the way the search tools fetch pages:
through the SSRF-guarded client (http(s) only, every redirect hop's address checked,
private and loopback hosts refused, size capped), stored once under its content hash in
the artifacts folder. A path is checked to be a readable image, so a typo or a text
file fails in milliseconds, not after a model has loaded.

`query_items` reads `mars search`'s stdin: a line that starts with `{` is a record
(`{"query": …}` and whatever else it carries), any other non-blank line is a query.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

from mars_cli.errors import MarsError, ToolError

MAX_IMAGE_BYTES = 64_000_000


def local_image(src: str, folder: str | os.PathLike, *, allow_private: bool = False, timeout: float = 30.0) -> str:
    """A local path for `src` (downloaded when it is a URL); MarsError when it is no image."""
    from mars_cli.eval.convert import image_extension

    if src.startswith(("http://", "https://")):
        from mars_cli.spool import store
        from mars_cli.tools.web import HttpClient

        http = HttpClient(timeout=timeout, retries=1, max_bytes=MAX_IMAGE_BYTES, allow_private=allow_private,
                          user_agent="mars/0.1")
        try:
            data, ctype, _ = http.get_bytes(src, what=f"fetch {src}")
        except ToolError as e:
            raise MarsError(str(e)) from None
        finally:
            http.close()
        ext = image_extension(data)
        if ext is None:
            raise MarsError(f"{src}: not an image (got {ctype or 'no content type'}, {len(data)} bytes)")
        return str(store(folder, data, ext))  # makes the folder (an OS error is a MarsError)
    if "://" in src:
        raise MarsError(f"{src}: only http(s) URLs and local files are supported")
    path = Path(src)
    if not path.is_file():
        raise MarsError(f"{src}: no such image file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise MarsError(f"{src}: cannot read ({e.strerror})") from None
    if image_extension(head) is None:
        raise MarsError(f"{src}: not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)")
    return src


def query_items(skip_bad: bool = False, stream=None) -> Iterator[tuple[object, dict]]:
    """(where, record) from stdin: JSON records, or plain-text lines as {"query": line}."""
    import orjson

    from mars_cli import streams
    from mars_cli.jsonl import Where

    stream = stream if stream is not None else sys.stdin.buffer
    for n, raw in enumerate(stream, 1):
        text = raw.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
        if not text:
            continue
        where = Where("<stdin>", n)
        if not text.startswith("{"):
            yield where, {"query": text}
            continue
        try:
            rec = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            if skip_bad:
                streams.warn(f"{where}: skipped: invalid JSON: {e}")
                continue
            raise where.error(f"invalid JSON: {e} (a line that does not start with '{{' is read as a query)") from None
        yield where, rec
