"""Where output goes: records to the real stdout, everything else to stderr.

Libraries we load (vLLM, DeepSpeed, some tokenizers) print to stdout. A single stray
line would corrupt a JSONL stream that the next command in the pipe parses, so at entry
`guard_stdout` keeps a private handle on the real stdout for records and points file
descriptor 1 at stderr. Core modules write records only through `records_out()`.
"""

from __future__ import annotations

import contextvars
import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

_records = None
# The name errors and warnings are prefixed with ("mars judge"); set by the CLI group.
program: contextvars.ContextVar[str] = contextvars.ContextVar("program", default="mars")


def guard_stdout() -> None:
    """Keep the real stdout for records; send fd 1 (C and Python prints) to stderr."""
    global _records
    if _records is not None:
        return
    sys.stdout.flush()
    _records = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)


def records_out():
    """The binary stream records are written to (the guarded stdout, or sys.stdout)."""
    if _records is not None:
        return _records
    return sys.stdout.buffer


def close_records() -> None:
    """Flush the guarded stdout; a closed reader (`| head`) is not an error."""
    global _records
    if _records is None:
        return
    try:
        _records.flush()
    except BrokenPipeError:
        silence_broken_pipe()
    _records = None


def silence_broken_pipe() -> None:
    """After the reader went away, stop Python complaining when it flushes at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if _records is not None:
        try:
            os.dup2(devnull, _records.fileno())
        except OSError:
            pass
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def warn(message: str) -> None:
    """One line on stderr, prefixed with the program name."""
    sys.stderr.write(f"{program.get()}: {message}\n")
    sys.stderr.flush()


def progress_enabled() -> bool:
    """Bars on a terminal only, unless MARS_PROGRESS=1 (or 0) says otherwise."""
    env = os.environ.get("MARS_PROGRESS")
    if env is not None:
        return env not in ("", "0", "false", "no")
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, **kwargs) -> Iterable[T]:
    """A tqdm bar on stderr (quiet when stderr is not a terminal)."""
    from tqdm import tqdm

    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, **kwargs)
