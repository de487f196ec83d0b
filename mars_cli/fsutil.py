"""Atomic file and directory writes: a temporary name, renamed when complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mars_cli.dirswap import apply_umask, make_temp_dir, recover_dir, replace_dir  # noqa: F401
from mars_cli.errors import MarsError


def default_file_mode() -> int:
    """0666 less the umask: what open() would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` on success."""
    path = Path(path)
    if not path.parent.exists():
        raise MarsError(f"{path}: directory {path.parent} does not exist")
    if path.exists() and not path.is_file():
        # A device or pipe (/dev/null, a FIFO): never rename over it.
        raise MarsError(f"{path}: not a regular file; give a file path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; swap it into place on success.

    An existing `path` is replaced only after the new one is complete, and the swap is
    journalled (replace_dir), so a kill at any instant leaves the previous or the new
    directory at `path` once recover_dir has run; a kill while writing leaves a
    temporary folder that the next run deletes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    if path.exists() and not replace:
        raise MarsError(f"{path}: already exists")
    tmp = make_temp_dir(path)
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike):
    """A JSON file's value; invalid JSON is a MarsError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MarsError(f"{path}: invalid JSON: {e}") from None


def read_manifest(index_dir: str | os.PathLike, fmt: str, what: str, fields: dict[str, type]) -> dict:
    """An index folder's manifest.json, checked: its format and the fields a reader uses.

    A truncated or hand-edited manifest is a one-line error naming the file, not a
    KeyError deep in the loader.
    """
    index_dir = Path(index_dir)
    recover_dir(index_dir)
    mf = index_dir / "manifest.json"
    if not mf.is_file():
        raise MarsError(f"{index_dir}: not {what} (no manifest.json; build one with `mars index`)")
    manifest = read_json(mf)
    if not isinstance(manifest, dict):
        raise MarsError(f"{mf}: expected a JSON object")
    if manifest.get("format") != fmt:
        raise MarsError(f"{index_dir}: not {what} (format {manifest.get('format')!r})")
    for key, typ in fields.items():
        v = manifest.get(key)
        if not isinstance(v, typ) or isinstance(v, bool):
            name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise MarsError(f"{mf}: field {key!r} is missing or not a {name} (rebuild the index)")
    return manifest
