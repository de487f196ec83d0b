"""Content-addressed files: the one writer for every folder of files named by their hash.

    store(folder, data, ".png")   -> folder/<sha256[:32]>.png   (crops, thumbnails, downloads)
    Spool(max_bytes=…, max_files=…)                              (mars serve's image spool)

`store` is safe for any number of threads and processes writing the same folder at once:
each writer writes its own temporary file (named after its pid, so a kill -9 leftover is
deleted by the next writer of that name, dirswap.recover_dir) and renames it into place.
Two writers of the same bytes both succeed: the name says what the content is, so a
file already there is the file wanted, and a rename over it replaces it with equal bytes.

A `Spool` is a private folder for a long-lived process, bounded in bytes and in files.
Concurrency rules:
- `hold(data)` takes a reference before the file is written, and every holder (not only
  the first) makes sure the file exists, so a holder never sees a half-written file and
  never sees its file evicted; `release(path)` drops the reference;
- eviction removes least recently used files that no one holds, under the same lock as
  the references, until the folder is within both bounds (held files may exceed them);
- `discard(path)` releases and, when no one else holds it, deletes at once (a refused
  upload does not wait for eviction);
- the folder is named after the process (`mars-spool-HOST-PID-…`); creating a spool
  deletes the folders of spools whose process no longer runs on this host.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from mars_cli.dirswap import _HOST, _alive
from mars_cli.fsutil import default_file_mode, os_errors, sha256_bytes, temp_file

NAME_CHARS = 32  # hex digits of sha256 in a stored name (128 bits)
_SPOOL = re.compile(r"^mars-spool-([0-9a-f]{8})-(\d+)-[\w.]+$")


def content_name(data: bytes, suffix: str = "") -> str:
    return sha256_bytes(data)[:NAME_CHARS] + suffix


def store(folder: str | os.PathLike, data: bytes, suffix: str = "", *, name: str | None = None) -> Path:
    """`folder/<hash><suffix>` holding `data`, written atomically unless already there.

    OS errors become MarsError("PATH: message").
    """
    folder = Path(folder)
    path = folder / (name or content_name(data, suffix))
    try:
        if path.stat().st_size == len(data):
            return path  # complete: only whole files are ever renamed into place
    except OSError:
        pass
    with os_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    with os_errors(path):
        fd, tmp = temp_file(path, suffix=".part")
    try:
        with os_errors(path, Path(tmp)):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, default_file_mode())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class _Entry:
    __slots__ = ("refs", "size")

    def __init__(self):
        self.refs = 0
        self.size = 0


class Spool:
    """A private, bounded, reference-counted folder of content-addressed files."""

    def __init__(self, *, max_bytes: int, max_files: int, parent: str | os.PathLike | None = None):
        self.max_bytes, self.max_files = max_bytes, max_files
        parent = Path(parent or tempfile.gettempdir())
        sweep_dead_spools(parent)
        parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"mars-spool-{_HOST}-{os.getpid()}-", dir=parent))
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # name -> entry, least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted = 0

    def hold(self, data: bytes, suffix: str = "") -> Path:
        """The path of a file holding `data`, kept until `release(path)`."""
        name = content_name(data, suffix)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = _Entry()
            entry.refs += 1
            self._entries.move_to_end(name)
        try:
            path = store(self.dir, data, name=name)
        except BaseException:
            self.release(self.dir / name)
            raise
        with self._lock:
            self._bytes += len(data) - entry.size
            entry.size = len(data)
            self._evict()
        return path

    def release(self, path: str | os.PathLike, *, discard: bool = False) -> None:
        """Drop one reference to `path`; `discard`: delete it now if no one else holds it."""
        name = Path(path).name
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            entry.refs -= 1
            if discard and entry.refs == 0:
                self._remove(name)
            else:
                self._evict()

    def discard(self, path: str | os.PathLike) -> None:
        self.release(path, discard=True)

    def _evict(self) -> None:
        """Least recently used unheld files go until both bounds hold (called under the lock)."""
        if self._bytes <= self.max_bytes and len(self._entries) <= self.max_files:
            return
        for name in [n for n, e in self._entries.items() if e.refs == 0]:
            if self._bytes <= self.max_bytes and len(self._entries) <= self.max_files:
                break
            self._remove(name)
            self.evicted += 1

    def _remove(self, name: str) -> None:
        entry = self._entries.pop(name)
        self._bytes -= entry.size
        try:
            os.unlink(self.dir / name)
        except FileNotFoundError:
            pass

    def info(self) -> dict:
        with self._lock:
            return {"files": len(self._entries), "bytes": self._bytes, "held": sum(e.refs > 0 for e in self._entries.values()),
                    "evicted": self.evicted, "max_bytes": self.max_bytes, "max_files": self.max_files}

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        shutil.rmtree(self.dir, ignore_errors=True)


def sweep_dead_spools(parent: str | os.PathLike) -> list[Path]:
    """Delete the spool folders in `parent` of processes that no longer run on this host."""
    gone = []
    try:
        names = os.listdir(parent)
    except OSError:
        return gone
    for n in names:
        m = _SPOOL.match(n)
        if m and m.group(1) == _HOST and not _alive(int(m.group(2))):
            shutil.rmtree(Path(parent) / n, ignore_errors=True)
            gone.append(Path(parent) / n)
    return gone
