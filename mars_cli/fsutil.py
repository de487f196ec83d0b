"""Atomic file and directory writes: a temporary name, renamed when complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from mars_cli.dirswap import apply_umask, make_temp_dir, recover_dir, replace_dir, temp_prefix  # noqa: F401
from mars_cli.errors import MarsError


def default_file_mode() -> int:
    """0666 less the umask: what open() would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def os_message(e: OSError, path: str | os.PathLike, tmp: Path | None = None) -> str:
    """`PATH: message` for an OS error met while writing `path` (through `tmp`)."""
    where = e.filename if e.filename is not None else path
    if tmp is not None and str(where).startswith(str(tmp)):
        where = path  # the temporary name means nothing to the user
    text = (e.strerror or str(e)).rstrip(".")
    return f"{where}: {text[:1].lower() + text[1:]}"


@contextlib.contextmanager
def os_errors(path: str | os.PathLike, tmp: Path | None = None) -> Iterator[None]:
    """Turn an OSError (disk full, read-only, permission) into `MarsError("PATH: message")`.

    A reader that went away (BrokenPipeError) passes through: that is how pipes end.
    """
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise MarsError(os_message(e, path, tmp)) from None


def temp_file(path: Path, suffix: str = "") -> tuple[int, str]:
    """mkstemp beside `path`, named after this process so that the next writer of `path`
    deletes it if a kill -9 left it behind (dirswap.recover_dir)."""
    recover_dir(path)
    return tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix, dir=path.parent)


def is_special(path: Path) -> bool:
    """An existing device, FIFO or socket: written in place, never renamed over."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_output(path: str | os.PathLike, *, kind: str = "file", create: bool = True) -> Path:
    """Fail early (before hours of work) if `path` cannot be written as a `kind` (file/dir).

    The folder it goes in must accept a new file: a probe file is created and removed
    there, which also catches read-only filesystems that os.access does not. An existing
    device or FIFO is fine for a file (written in place); a directory output must not
    replace anything that is not a directory. A directory output's missing parent folders
    are made (`create`), or, when only checking, the nearest existing one is probed.
    """
    path = Path(path)
    if kind == "file" and is_special(path):
        return path
    if path.is_dir() and kind == "file":
        raise MarsError(f"{path}: is a directory, expected a file name")
    if path.exists() and kind == "dir" and not path.is_dir():
        raise MarsError(f"{path}: exists and is not a directory")
    parent = path.parent
    if not parent.exists():
        if kind != "dir":
            raise MarsError(f"{path}: directory {parent} does not exist")
        if create:
            with os_errors(parent):
                parent.mkdir(parents=True, exist_ok=True)
        else:
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
    if not parent.is_dir():
        raise MarsError(f"{path}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        e.filename = None
        raise MarsError(f"{path}: cannot write in {parent}: {os_message(e, '')[2:]}") from None
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` on success.

    An existing device or FIFO (`-o /dev/stdout`, a named pipe) is yielded itself and
    written in place. OS errors become `MarsError("PATH: message")`.
    """
    path = check_output(path)
    if is_special(path):
        with os_errors(path):
            yield path
        return
    with os_errors(path):
        fd, tmp = temp_file(path, suffix=path.suffix)
        os.close(fd)
    tmp = Path(tmp)
    try:
        with os_errors(path, tmp):
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
    temporary folder that the next run deletes. OS errors become `MarsError("PATH: …")`.
    """
    path = check_output(path, kind="dir")
    with os_errors(path):
        recover_dir(path)
    if path.exists() and not replace:
        raise MarsError(f"{path}: already exists")
    with os_errors(path):
        tmp = make_temp_dir(path)
    try:
        with os_errors(path, tmp):
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


def read_json_object(path: str | os.PathLike) -> dict:
    """read_json for files that must hold one JSON object (configs, manifests)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise MarsError(f"{path}: expected a JSON object")
    return value


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
    manifest = read_json_object(mf)
    if manifest.get("format") != fmt:
        raise MarsError(f"{index_dir}: not {what} (format {manifest.get('format')!r})")
    for key, typ in fields.items():
        v = manifest.get(key)
        if not isinstance(v, typ) or isinstance(v, bool):
            name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise MarsError(f"{mf}: field {key!r} is missing or not a {name} (rebuild the index)")
    return manifest
