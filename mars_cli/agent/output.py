"""Where `mars rollout` writes trajectories: stdout, or `-o FILE` appended per episode.

`-o FILE` is the one output that is not written to a temporary name and renamed: each
finished episode is appended and flushed at once, so a crash or `kill -9` loses only the
episodes still running, and `--resume` continues from what the file holds. Without
`--resume` an existing file is truncated when the run starts.

`--resume` reads the file first. A last line without its newline (a write cut by a kill)
is dropped, and so are episodes that ended `error` (a dead server, a failed request): they
run again. When anything is dropped the file is rewritten first (temporary name, rename),
so the append that follows never lands after a half line.

`--group-order`: a group's samples are held until the whole group has finished and then
written together, in sample order, so a downstream stage can close a batch on group
boundaries. What is held when the run ends early is still written at close.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import orjson

from mars_cli import streams
from mars_cli.errors import MarsError, RecordError
from mars_cli.jsonl import BOM, RecordWriter, check_finite, dumps

FRESH = ("tokens", "tool_calls", "elapsed", "policy")


def load_resumable(path: Path) -> tuple[list[bytes], set[tuple[str, int]], int]:
    """(lines to keep, the (group, sample) pairs they finish, how many lines were dropped)."""
    keep: list[bytes] = []
    done: set[tuple[str, int]] = set()
    dropped = 0
    data = path.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM):]
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        streams.warn(f"{path}: dropping a truncated last line (an interrupted write); its episode runs again")
        dropped += 1
    errors = 0
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise RecordError(str(path), i, f"invalid JSON: {e} (not a file this rollout wrote?)") from None
        if not isinstance(rec, dict):
            raise RecordError(str(path), i, "expected a JSON object")
        if rec.get("finish") == "error":
            errors += 1
            dropped += 1
            continue
        keep.append(raw + b"\n")
        if "group" in rec and "sample" in rec and rec.get("finish"):
            done.add((str(rec["group"]), rec["sample"]))
    if errors:
        streams.warn(f"{path}: {errors} episode{'s' if errors != 1 else ''} that ended in error will run again")
    return keep, done, dropped


class EpisodeOutput:
    """Writes finished trajectories; `done` holds the (group, sample) pairs --resume skips."""

    def __init__(self, out: str | None, *, resume: bool = False, n: int = 1, group_order: bool = False):
        self.path = None if out in (None, "-") else Path(out)
        self.n = n
        self.group_order = group_order
        self.done: set[tuple[str, int]] = set()
        self.kept = 0
        self._held: dict[str, list[dict]] = {}
        self._stdout: RecordWriter | None = None
        self._f = None
        if self.path is None:
            self._stdout = RecordWriter(None)
            return
        if self.path.exists() and not self.path.is_file():  # a device or FIFO: written in place
            self._f = self._open("wb")
            return
        if not self.path.parent.exists():
            raise MarsError(f"{self.path}: directory {self.path.parent} does not exist")
        if resume and self.path.exists():
            keep, self.done, dropped = load_resumable(self.path)
            self.kept = len(keep)
            if dropped:
                self._rewrite(keep)
            self._f = self._open("ab")
        else:
            self._f = self._open("wb")

    @staticmethod
    def check(out: str | None) -> None:
        """Refuse an -o that cannot be written, before any expensive work (nothing is touched)."""
        if out in (None, "-"):
            return
        path = Path(out)
        if not path.parent.exists():
            raise MarsError(f"{path}: directory {path.parent} does not exist")
        if path.exists() and path.is_dir():
            raise MarsError(f"{path}: is a directory")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise MarsError(f"{path}: permission denied")

    def _open(self, mode: str):
        try:
            return open(self.path, mode, buffering=0)
        except OSError as e:
            raise MarsError(f"{self.path}: cannot write: {e.strerror}") from None

    def _rewrite(self, lines: list[bytes]) -> None:
        from mars_cli.fsutil import default_file_mode

        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, default_file_mode())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def expected(self, group: str) -> int:
        return self.n - sum(1 for g, _ in self.done if g == group)

    def write(self, rec: dict) -> None:
        if not self.group_order:
            self._write(rec)
            return
        held = self._held.setdefault(str(rec["group"]), [])
        held.append(rec)
        if len(held) >= self.expected(str(rec["group"])):
            for r in sorted(self._held.pop(str(rec["group"])), key=lambda r: r["sample"]):
                self._write(r)

    def _write(self, rec: dict) -> None:
        if self._stdout is not None:
            self._stdout.write(rec, fresh=FRESH)
            return
        for k in FRESH:
            if k in rec:
                check_finite(rec[k], k)
        if "schema_version" not in rec:
            from mars_cli.records import SCHEMA_VERSION

            rec = {"schema_version": SCHEMA_VERSION, **rec}
        view = memoryview(dumps(rec))
        try:
            while view:  # unbuffered: in the file (the OS's cache) when this returns
                view = view[self._f.write(view):]
        except OSError as e:
            raise MarsError(f"{self.path}: cannot write: {e.strerror}") from None

    def close(self) -> None:
        """Write what --group-order still holds (a run that ended early), then close."""
        for group in list(self._held):
            for r in sorted(self._held.pop(group), key=lambda r: r["sample"]):
                self._write(r)
        if self._stdout is not None:
            self._stdout.close()
        elif self._f is not None:
            self._f.close()
            self._f = None
