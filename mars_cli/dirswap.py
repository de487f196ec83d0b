"""Crash-safe replacement of a directory, and recovery of an interrupted one.

A directory cannot be renamed over a non-empty one, so replacing `dest` takes two
renames; a kill between them would leave neither the old nor the new at `dest`. The
swap is therefore journalled, in files beside `dest` in its parent folder:

    .NAME.swap                 {"new": ".NAME.tmp-…"}: written (atomically) before the swap
    .NAME.old                  the previous `dest` while the swap is in progress
    .NAME.tmp-HOST-PID-RAND    a writer's temporary directory or file (fsutil.atomic_dir,
                               atomic_file, jsonl.RecordWriter)
    .NAME.trash-HOST-PID-RAND  a previous version being deleted after the swap

Sequence: journal → dest→.old → new→dest → .old→trash → unlink journal → delete trash.
At every instant either `dest` or `.old` + the journalled `new` exist. recover_dir
(run before reading `dest` and before every replacement) rolls a journalled swap
forward: the new directory was complete before the journal was written. Without a
journal a lone `.old` is restored when `dest` is missing, else deleted. Temporary
and trash directories of a process that no longer runs on this host (a kill -9) are
deleted. Swaps in one parent folder are serialised by an flock on the folder, so a
reader never "recovers" a swap that a live process is in the middle of.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OWNED = re.compile(r"^(tmp|trash)-([0-9a-f]{8})-(\d+)-[\w.]+$")


def temp_prefix(dest: Path, kind: str = "tmp") -> str:
    """Name prefix of this process's temporary directories for `dest`."""
    return f".{dest.name}.{kind}-{_HOST}-{os.getpid()}-"


def make_temp_dir(dest: Path) -> Path:
    """A new, empty temporary directory beside `dest`, owned by this process."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give every file and folder under `root` the mode a plain open()/mkdir() would.

    tempfile and some writers create 0600/0700 entries; checkpoints must be readable by
    whoever the umask allows (a teammate, a serving container).
    """
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o777 & ~mask)
        for n in files:
            p = os.path.join(d, n)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(parent: Path):
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks (some NFS mounts): go on unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _trash(path: Path, dest: Path) -> Path:
    """Rename `path` out of the way (fast, under the lock); delete it later."""
    target = Path(tempfile.mkdtemp(prefix=temp_prefix(dest, "trash"), dir=dest.parent))
    os.replace(path, target / "x")
    return target


def _finish(dest: Path, journal: Path, trash: list[Path]) -> None:
    parent = dest.parent
    old = parent / f".{dest.name}.old"
    try:
        new = parent / str(json.loads(journal.read_text())["new"])
    except (OSError, ValueError, KeyError, TypeError):
        new = None  # written atomically, so only damaged by hand: fall back to .old
    if new is not None and new.name.startswith(f".{dest.name}.") and new.is_dir():
        if dest.exists() or dest.is_symlink():
            if old.exists():
                trash.append(_trash(old, dest))
            os.replace(dest, old)
        os.replace(new, dest)
        _fsync_dir(parent)
    elif not dest.exists() and old.exists():
        os.replace(old, dest)
    if old.exists():
        trash.append(_trash(old, dest))
    journal.unlink()
    _fsync_dir(parent)


def _legacy_backup(dest: Path) -> tuple[Path, Path] | None:
    """The newest backup an older mars left: `.NAME.old-*/x` or a `.NAME.old-*` folder."""
    found = []
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.old-*"):
        if not p.is_dir():
            continue
        q = p / "x" if (p / "x").exists() else p
        if q.is_dir() and not any(q.iterdir()):
            continue
        found.append((p.stat().st_mtime, str(p), p, q))
    return max(found)[2:] if found else None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _recover_locked(dest: Path, trash: list[Path], keep: Path | None = None) -> None:
    parent = dest.parent
    journal = parent / f".{dest.name}.swap"
    old = parent / f".{dest.name}.old"
    if journal.exists():
        _finish(dest, journal, trash)
    elif old.exists():
        if dest.exists():
            trash.append(_trash(old, dest))
        else:
            os.replace(old, dest)
    if not dest.exists():
        legacy = _legacy_backup(dest)
        if legacy:
            holder, content = legacy
            os.replace(content, dest)
            if holder != content:
                _remove(holder)
    prefix = f".{dest.name}."
    for n in os.listdir(parent):
        if not n.startswith(prefix):
            continue
        m = _OWNED.match(n[len(prefix):])
        p = parent / n
        if m and m.group(2) == _HOST and p != keep and not _alive(int(m.group(3))):
            trash.append(p)


def _has_leftovers(dest: Path) -> bool:
    prefix = f".{dest.name}."
    try:
        return any(n.startswith(prefix) for n in os.listdir(dest.parent))
    except OSError:
        return False


def recover_dir(dest: str | os.PathLike) -> None:
    """Finish or undo an interrupted replacement of `dest`; delete stale temporaries.

    Cheap when there is nothing to do (one listdir of the parent). Never raises for a
    read-only parent: whatever is there is then read as it is.
    """
    dest = Path(dest)
    if not _has_leftovers(dest):
        return
    trash: list[Path] = []
    try:
        with _locked(dest.parent):
            _recover_locked(dest, trash)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    for t in trash:
        _remove(t)


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the complete directory `tmp` to `dest`, replacing any `dest`, crash-safely.

    `tmp` must be in the same folder as `dest` (one filesystem) and complete: from the
    moment the journal names it, recovery rolls the swap forward to it.
    """
    tmp, dest = Path(tmp), Path(dest)
    if tmp.parent.resolve() != dest.parent.resolve():
        raise ValueError(f"{tmp} must be beside {dest}")
    apply_umask(tmp)
    trash: list[Path] = []
    with _locked(dest.parent):
        _recover_locked(dest, trash, keep=tmp)
        journal = dest.parent / f".{dest.name}.swap"
        fd, jtmp = tempfile.mkstemp(prefix=temp_prefix(dest), dir=dest.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"new": tmp.name}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(jtmp, journal)
        _fsync_dir(dest.parent)
        _finish(dest, journal, trash)
    for t in trash:
        _remove(t)
