"""The error types every command turns into `mars CMD: message` + exit 1."""

from __future__ import annotations


class MarsError(Exception):
    """A user-facing failure: bad data, a missing file, a failed run.

    The message is printed as `mars CMD: message` and the process exits 1.
    Keep it lowercase and specific: say which file/line/field and what was wrong.
    """

    exit_code = 1


class RecordError(MarsError):
    """A bad input record, located by file and line."""

    def __init__(self, source: str, line: int | None, message: str):
        self.source = source
        self.line = line
        self.detail = message
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


class UsageError(MarsError):
    """Wrong flags or arguments: exit 2, like click's own usage errors."""

    exit_code = 2


class ToolError(Exception):
    """A tool call that failed (timeout, bad arguments, backend error).

    Not fatal: the agent loop renders the message as the tool's result so the model can
    read it and go on. `mars search` and friends turn it into a MarsError.
    """


# After SIGTERM, how long a command may take to end as on Ctrl-C (a follow run saving its
# last step) before main.run ends it at once; a second SIGTERM ends it at once too.
TERM_GRACE_S = 60.0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (main.run installs the handler): a command ends
    as on Ctrl-C (its `finally` blocks run, a follow run saves its last whole step, each
    stage prints its summary line), then exits 143."""

    raised = False  # set by the handler: a generator closed meanwhile is closed by it


def stop_word(e: BaseException) -> str:
    """How Ctrl-C (KeyboardInterrupt) or SIGTERM (Terminated) ended a command, in its messages."""
    return "terminated" if isinstance(e, Terminated) else "interrupted"


def stop_status(e: BaseException) -> int:
    return 143 if isinstance(e, Terminated) else 130
