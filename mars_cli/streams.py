"""Where output goes: records to the real stdout, everything else to stderr.

Libraries we load (vLLM, DeepSpeed, some tokenizers) print to stdout. A single stray
line would corrupt a JSONL stream that the next command in the pipe parses, so at entry
`guard_stdout` keeps a private handle on the real stdout for records and points file
descriptor 1 at stderr. Core modules write records only through `records_out()`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from typing import Iterable, TypeVar

from mars_cli.urls import redact

T = TypeVar("T")

_records = None
_closed: set[int] = set()  # standard descriptors that were closed when mars started
# The name errors and warnings are prefixed with ("mars judge"); set by the CLI group.
program: contextvars.ContextVar[str] = contextvars.ContextVar("program", default="mars")
# The same name for threads a command starts (tool calls, judges): a new thread does not
# inherit the context, and its warnings must still say `mars rollout:`, not `mars:`.
_process_program = "mars"


def current_program() -> str:
    name = program.get()
    return name if name != "mars" else _process_program


def set_program(name: str):
    """Name the running command (context and process-wide); returns a token for reset_program."""
    global _process_program
    previous = _process_program
    _process_program = name
    return program.set(name), previous


def reset_program(token) -> None:
    global _process_program
    ctx_token, _process_program = token
    program.reset(ctx_token)


def reopen_closed_std() -> None:
    """Put /dev/null on a closed fd 0, 1 or 2 (`mars judge x >&-`) and remember it.

    Otherwise the next open() would get that number and records or log lines would land
    in whatever file it was (a checkpoint, a crop). Reading a closed stdin or writing
    records to a closed stdout is then a one-line error (stdin_stream, records_out).
    """
    for fd, mode in ((0, "r"), (1, "w"), (2, "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDONLY if mode == "r" else os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        _closed.add(fd)
        stream = os.fdopen(fd, mode, closefd=False)
        setattr(sys, ("stdin", "stdout", "stderr")[fd], stream)


def stdout_closed() -> bool:
    return 1 in _closed


def stdin_stream():
    """The binary stdin records are read from; a closed stdin is a MarsError."""
    from mars_cli.errors import MarsError

    if 0 in _closed or sys.stdin is None:
        raise MarsError("<stdin>: standard input is closed; name an input file or pipe records in")
    return sys.stdin.buffer
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
    if 1 in _closed:
        from mars_cli.errors import MarsError

        raise MarsError("standard output is closed; redirect it or write to a file with -o")
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
_closed: set[int] = set()  # standard descriptors that were closed when mars started


class RedactingFormatter(logging.Formatter):
    """Log lines with URL credentials masked (httpx and the OpenAI client log whole URLs)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


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
    """One line on stderr, prefixed with the program name; URL credentials masked."""
    held = _held.get()
    if held is not None:
        held.append(message)
        return
    sys.stderr.write(f"{current_program()}: {redact(message)}\n")
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
    kwargs.pop("per_input", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, disable=mode == "off", **kwargs)
