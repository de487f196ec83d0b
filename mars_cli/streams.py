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
    sys.stderr.write(f"{current_program()}: {message}\n")
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
