"""Streaming JSONL in and out, with file:line errors and atomic output files.

Reading rules (each has a test):
- no file or `-` means stdin; several files are read in order;
- a UTF-8 byte-order mark at the start of a file is dropped;
- blank (whitespace-only) lines are skipped;
- a last line without a final newline is accepted when it parses; when it does not, it is
  reported as a truncated last line (a producer that was killed mid-write);
- anything that is not a JSON object is an error naming file and line. With `skip_bad`
  the line is skipped with a warning instead, and a count is printed at the end;
- a line longer than MARS_MAX_LINE_BYTES (default 256 MiB) is such an error too ("line
  longer than N bytes"), found without holding it: the reader takes at most N + 1 bytes of
  a line and passes over the rest in 1 MiB pieces.

Writing: one object per line, flushed per record so pipes stream; NaN/Inf are refused
(orjson would silently write `null`); `-o FILE` goes to a temporary name beside FILE and
is renamed over it only when the whole stream was written.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

import orjson

from mars_cli import streams
from mars_cli.errors import MarsError, RecordError
from mars_cli.progress import arrived, reading

BOM = b"\xef\xbb\xbf"
DEFAULT_MAX_LINE_BYTES = 1 << 28  # a trajectory of 100k tokens with log-probs is ~5 MB
WRITER_MAX_DEPTH = 254  # orjson.dumps refuses deeper nesting


def _maybe_too_deep(text: bytes) -> bool:
    """Whether a parsed line could nest WRITER_MAX_DEPTH levels: only if it holds that many
    '[' and '{' (and as many closers: it parsed). Checked for every line read.

    Two `bytes.count` passes cost a third of orjson's parse on a 50 KB trajectory line;
    '[' (0x5B) and '{' (0x7B) differ only in bit 5, so one vectorized pass counts both.
    """
    if len(text) < 2 * WRITER_MAX_DEPTH:
        return False
    if len(text) < 4096:
        return text.count(b"[") + text.count(b"{") >= WRITER_MAX_DEPTH
    import numpy as np

    return int(np.count_nonzero((np.frombuffer(text, np.uint8) | 0x20) == 0x7B)) >= WRITER_MAX_DEPTH


def _unwritable(obj) -> str | None:
    """Why a parsed record could not be written back out (None when it can)."""
    try:
        orjson.dumps(obj)
    except orjson.JSONEncodeError as e:
        return f"nested too deeply to be written back (more than {WRITER_MAX_DEPTH} levels): {e}"
    return None


@dataclass(frozen=True)
class Where:
    """A record's origin, for error messages: `batch.jsonl:17`."""

    source: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line}"

    def error(self, message: str) -> RecordError:
        return RecordError(self.source, self.line, message)


class SkipCounter:
    """Counts lines skipped under --skip-bad and reports them once at the end."""

    def __init__(self) -> None:
        self.count = 0

    def report(self) -> None:
        if self.count:
            streams.warn(f"skipped {self.count} bad line{'s' if self.count != 1 else ''}")


def _open_sources(paths: Iterable[str | os.PathLike] | None) -> Iterator[tuple[str, IO[bytes]]]:
    paths = list(paths or [])
    if not paths:
        paths = ["-"]
    for p in paths:
        p = str(p)
        if p == "-":
            yield "<stdin>", streams.stdin_stream()
            continue
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            raise MarsError(f"{p}: no such file") from None
        except IsADirectoryError:
            raise MarsError(f"{p}: is a directory, expected a JSONL file") from None
        except PermissionError:
            raise MarsError(f"{p}: permission denied") from None
        with f:
            yield p, f


def _lines(f: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """The lines of `f` (newline kept); None for a line over `limit` bytes, read past unheld."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or (len(raw) == limit + 1 and raw.endswith(b"\n")):
            yield raw
            continue
        while True:  # the rest of the long line, in pieces never kept
            piece = f.readline(1 << 20)
            if not piece or piece.endswith(b"\n"):
                break
        yield None


def read_located(
    paths: Iterable[str | os.PathLike] | None = None,
    *,
    skip_bad: bool = False,
    skipped: SkipCounter | None = None,
    with_text: bool = False,
) -> Iterator[tuple]:
    """Yield (where, record) for every record of the named files (or stdin).

    With `with_text`, (where, record, text): text is the record's JSON object as read
    (whitespace and byte-order mark stripped), for `RecordWriter.write_extended`.
    """
    from mars_cli.settings import env_number

    counter = skipped if skipped is not None else SkipCounter()
    limit = env_number("MARS_MAX_LINE_BYTES", DEFAULT_MAX_LINE_BYTES)
    for source, f in _open_sources(paths):
        lineno = 0
        for raw in reading(_lines(f, limit)):  # progress: the time a slow writer keeps this stage waiting
            lineno += 1
            if raw is None:
                msg = f"line longer than {limit:,} bytes (MARS_MAX_LINE_BYTES)"
                if skip_bad:
                    counter.count += 1
                    streams.warn(f"{source}:{lineno}: skipped: {msg}")
                    continue
                raise RecordError(source, lineno, msg)
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            terminated = raw.endswith(b"\n")
            text = raw.strip()
            if not text:
                continue
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError as e:
                if terminated:
                    msg = f"invalid JSON: {e}"
                else:
                    msg = "truncated last line (no final newline and not valid JSON; was the producer killed?)"
                if skip_bad:
                    counter.count += 1
                    streams.warn(f"{source}:{lineno}: skipped: {msg}")
                    continue
                raise RecordError(source, lineno, msg) from None
            msg = None
            if not isinstance(obj, dict):
                msg = f"expected a JSON object, got {type(obj).__name__}"
            elif _maybe_too_deep(text):
                msg = _unwritable(obj)  # orjson reads 1024 levels but writes only 254
            if msg:
                if skip_bad:
                    counter.count += 1
                    streams.warn(f"{source}:{lineno}: skipped: {msg}")
                    continue
                raise RecordError(source, lineno, msg)
            arrived()
            yield (Where(source, lineno), obj, text) if with_text else (Where(source, lineno), obj)
    if skipped is None:
        counter.report()


def read_records(paths: Iterable[str | os.PathLike] | None = None, *, skip_bad: bool = False) -> Iterator[dict]:
    """Yield the records of the named files (or stdin), see the module rules."""
    for _, rec in read_located(paths, skip_bad=skip_bad):
        yield rec


def read_file(path: str | os.PathLike) -> list[dict]:
    """All records of one file (small files: manifests, tests)."""
    return list(read_records([path]))


def check_finite(value, path: str = "") -> None:
    """Raise if a float anywhere inside `value` is NaN or infinite."""
    t = type(value)
    if t is float:
        if not math.isfinite(value):
            raise MarsError(f"refusing to write non-finite number {value} at {path or 'top level'}")
    elif t is dict:
        for k, v in value.items():
            if type(v) in (float, dict, list, tuple):
                check_finite(v, f"{path}.{k}" if path else str(k))
    elif t is list or t is tuple:
        for i, v in enumerate(value):
            tv = type(v)
            if tv is int or tv is str or tv is bool:
                continue
            check_finite(v, f"{path}[{i}]")
    elif isinstance(value, float):  # numpy floats and other subclasses
        if not math.isfinite(value):
            raise MarsError(f"refusing to write non-finite number {value} at {path or 'top level'}")


def dumps(record: dict) -> bytes:
    """One record as a JSON line (with the trailing newline)."""
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


class RecordWriter:
    """Write records to stdout or atomically to a file.

    `fresh` names the fields a stage added: only those are checked for NaN/Inf, since
    everything parsed from JSON is finite already. Without it the whole record is checked.
    """

    def __init__(self, out: str | os.PathLike | None = None, *, flush_each: bool = True):
        from mars_cli.fsutil import check_output, is_special, os_errors, temp_file

        self.out = None if out in (None, "-") else Path(out)
        self.flush_each = flush_each
        self.count = 0
        self._tmp: Path | None = None
        self._direct = False
        self._where = "<stdout>" if self.out is None else str(self.out)
        self._errors = os_errors
        if self.out is None:
            self._f = streams.records_out()
            return
        check_output(self.out)
        with os_errors(self.out):
            if is_special(self.out):
                # A device or pipe (-o /dev/null, a FIFO): write straight to it; renaming a
                # temporary file over it would replace the device with a regular file.
                self._f = open(self.out, "wb", buffering=1 << 16)
                self._direct = True
            else:
                fd, tmp = temp_file(self.out)
                self._tmp = Path(tmp)
                self._f = os.fdopen(fd, "wb", buffering=1 << 16)

    def write(self, record: dict, fresh: Iterable[str] | None = None) -> None:
        if fresh is None:
            check_finite(record)
        else:
            for k in fresh:
                if k in record:
                    check_finite(record[k], k)
        if "schema_version" not in record:
            from mars_cli.records import SCHEMA_VERSION

            record = {"schema_version": SCHEMA_VERSION, **record}
        try:
            line = dumps(record)
        except orjson.JSONEncodeError as e:
            raise MarsError(f"{self._where}: cannot write record {self.count + 1}: {e}") from None
        self._emit(line)

    def write_extended(self, text: bytes, fields: dict) -> None:
        """Write the record read as `text` (`read_located(with_text=True)`) with `fields`
        added at its end, leaving the rest as it was read: nothing re-serialized.

        For a stage that adds a few fields to large records (advantage on 2k-token
        trajectories): the line costs a copy, not a serialization of every token list, and
        the stage needs to keep only the text, not the parsed record. The output is the
        line `write` gives for the parsed record plus `fields`, when the input was written
        by mars. The caller checks that the record holds `schema_version` and none of
        `fields` (else it writes the parsed record with `write`).
        """
        for k, v in fields.items():
            check_finite(v, k)
        try:
            tail = orjson.dumps(fields, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError as e:
            raise MarsError(f"{self._where}: cannot write record {self.count + 1}: {e}") from None
        if not (text.startswith(b"{") and text.endswith(b"}")) or len(tail) <= 2:
            raise ValueError("write_extended needs a JSON object's text and at least one field")
        body = text[:-1].rstrip()
        self._emit(b"".join((body, b"," if body != b"{" else b"", tail[1:], b"\n")))

    def _emit(self, line: bytes) -> None:
        with self._errors(self._where, self._tmp):
            self._f.write(line)
            # stdout and a device or FIFO stream like a pipe: each record goes out whole at
            # once (a write error then surfaces at that record, before any summary line).
            if self.flush_each and (self.out is None or self._direct):
                self._f.flush()
        self.count += 1

    def close(self, ok: bool = True) -> None:
        if self._tmp is None:
            with self._errors(self._where):
                if self._direct:
                    self._f.close()
                elif ok:
                    self._f.flush()
            return
        try:
            with self._errors(self._where, self._tmp):
                self._f.close()
                if ok:
                    from mars_cli.fsutil import default_file_mode

                    os.chmod(self._tmp, default_file_mode())
                    os.replace(self._tmp, self.out)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()
            self._tmp = None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def write_records(records: Iterable[dict], out: str | os.PathLike | None = None) -> int:
    """Write every record; return how many."""
    with RecordWriter(out) as w:
        for r in records:
            w.write(r)
    return w.count
