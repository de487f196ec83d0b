"""Ending a pipeline stage whose reader has gone away while it waits for input.

`mars update --follow --max-steps N` exits while the stages before it are idle, blocked
reading their own input: they would learn that their reader is gone only at their next
write, which may never come (a rollout held back by --max-staleness waits for weights
the trainer will no longer push). A stage that writes records to a pipe therefore
watches the pipe: Linux reports POLLERR on a pipe's write end once no reader is left,
and the stage then ends at once with status 0, as a write to a closed pipe ends it, after
its summary line ("…; its reader went away"): in a pipeline every stage says how it ended.

A `tee` between two stages hides a reader that is gone until tee next writes, so this
is not the only way a pipeline ends: a rollout waiting for weights also watches the
trainer's lease on its servers (serve/lease.py).
"""

from __future__ import annotations

import os
import select
import stat
import sys
import threading
from typing import Callable

from mars_cli import streams


def exit_when_reader_gone(last_words: Callable[[], None] | None = None) -> bool:
    """Watch the record stream; end the process (status 0) when its reader closes it.

    Only when records go to a pipe (a file or terminal has no reader to lose). Returns
    whether a watch was started. Call it only where the records on stdout are the whole
    output: the process ends without finishing what it was doing. `last_words()` (from
    the watching thread) prints the stage's summary first.
    """
    out = streams.records_out()
    try:
        fd = out.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):
        return False
    global _last_words, _said
    _last_words, _said = last_words, threading.Lock()

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR and POLLHUP are reported without being asked for
        while True:
            for _, events in poller.poll():
                if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    _last()

    threading.Thread(target=watch, name="reader-gone", daemon=True).start()
    return True


_last_words: Callable[[], None] | None = None
_said = threading.Lock()


def say_last_words() -> None:
    """The watched stage's summary, once, however its end was noticed first: by the watch,
    or by a write that met the closed pipe (BrokenPipeError, main.py)."""
    if _last_words is not None and _said.acquire(blocking=False):
        try:
            _last_words()
        except Exception:  # the summary must never turn a clean end into a traceback
            pass


def claim_last_words() -> bool:
    """For a stage that prints its own summary when it ends: whether it should (False when
    the summary was already said because its reader went away)."""
    return _last_words is None or _said.acquire(blocking=False)


def _last() -> None:
    try:
        say_last_words()
        sys.stderr.flush()
    finally:
        os._exit(0)
