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
# -v count (set by the CLI): libraries' own bars and chatter reach stderr only when > 0.
verbosity = 0
# -q (set by the CLI): no progress and no summary lines; warnings and errors still print.
quiet = False


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


_held: contextvars.ContextVar[list | None] = contextvars.ContextVar("held_warnings", default=None)


def warn(message: str) -> None:
    """One line on stderr, prefixed with the program name."""
    held = _held.get()
    if held is not None:
        held.append(message)
        return
    sys.stderr.write(f"{program.get()}: {message}\n")
    sys.stderr.flush()


class hold_warnings:
    """Keep warnings back while setting up; print them if setup succeeds, drop them if not.

    `with hold_warnings(): toolbox = …; engine = …` — a note such as "text search is
    off" then never stands in front of the fatal error that stopped the run.
    """

    def __enter__(self):
        self._token = _held.set([])
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        held = _held.get() or []
        _held.reset(self._token)
        if exc_type is None:
            for message in held:
                warn(message)


_warned_once: set = set()


def warn_once(key, message: str) -> bool:
    """`warn(message)` the first time `key` is seen in this process; True if it printed."""
    if key in _warned_once:
        return False
    _warned_once.add(key)
    warn(message)
    return True


def summary(line: str) -> None:
    """`mars CMD: line` on stderr, TTY or not (only -q hides it): how a long command ends."""
    if not quiet:
        warn(line)


def progress_mode() -> str:
    """How long work reports itself: "bar" (tqdm), "log" (a line every N s) or "off".

    A terminal gets a bar; a log file gets plain lines. MARS_PROGRESS overrides:
    bar (or 1), log, or 0 (nothing); -q means nothing.
    """
    env = os.environ.get("MARS_PROGRESS", "").strip().lower()
    if quiet or env in ("0", "false", "no", "off"):
        return "off"
    if env in ("1", "true", "yes", "bar"):
        return "bar"
    if env == "log":
        return "log"
    return "bar" if sys.stderr.isatty() else "log"


def progress_enabled() -> bool:
    """True when progress is shown at all (bar or periodic lines)."""
    return progress_mode() != "off"


def progress(iterable: Iterable[T] | None = None, **kwargs) -> Iterable[T]:
    """Progress of long work on stderr: a tqdm bar on a terminal, periodic lines elsewhere.

    Takes tqdm's arguments (total, desc, unit, disable…) and gives tqdm's interface
    (iteration, update, set_postfix, close). Off a terminal it prints
    `mars CMD: desc 120/500 units (24%), 3.1 units/s, ETA 2m04s` every
    MARS_PROGRESS_INTERVAL seconds (30) and one summary line at close
    (summary=False leaves that to the caller).
    """
    mode = "off" if kwargs.pop("disable", False) else progress_mode()
    if mode == "log":
        from mars_cli.progress import LogProgress

        return LogProgress(iterable, **kwargs)
    from tqdm import tqdm

    kwargs.pop("summary", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, disable=mode == "off", **kwargs)
