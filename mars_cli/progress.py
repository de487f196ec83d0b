"""Progress for log files: a plain line every N seconds, then one summary line.

A tqdm bar is unreadable in a log (carriage returns, one line per redraw) and silent
until it ends when its output is buffered. Off a terminal `streams.progress` returns a
`LogProgress` instead: the same interface as tqdm (iterate, update, set_postfix,
set_description, close, a context manager), printing

    mars index: index 120000/500000 passages (24%), 3100 passages/s, ETA 2m03s

at most every MARS_PROGRESS_INTERVAL seconds (default 30, as vLLM logs its throughput)
and, at close, `mars index: index: 500000 passages in 2m41s (3105 passages/s)`.
Lines are printed from `update`, and by a timer thread when no unit finishes within an
interval, so a stage that waits still says so.

A pipeline stage counts its input (`per_input=True`: one `update` per input record, as
judge's): jsonl.read_located notes when each record arrived (`arrived`) and whether a
read is blocked (`reading`). Its rate then counts only the stage's own busy time, the
time it held at least one record that had arrived and was not finished, so a judge
behind a slow rollout reports how fast it judges, not how fast rollout writes; a line
while it waits says `waiting for input, 0 records in 1m00s`.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from typing import Iterable, Iterator

_clock = time.monotonic  # tests put a fake clock here


class _Input:
    """When input records arrived (kept only while a per-input bar counts them), and
    since when a read of the input has been blocked (None: not reading)."""

    def __init__(self):
        self.arrivals: deque[float] = deque()
        self.blocked_since: float | None = None
        self.counting = 0


_INPUT = _Input()


def arrived() -> None:
    """A record was read (jsonl.read_located calls this as it yields each one)."""
    if _INPUT.counting:
        _INPUT.arrivals.append(_clock())


def reading(lines: Iterable) -> Iterator:
    """`lines`, noting the time each read is blocked (a pipe whose writer is slow)."""
    it = iter(lines)
    while True:
        _INPUT.blocked_since = _clock()
        try:
            line = next(it)
        except StopIteration:
            return
        finally:
            _INPUT.blocked_since = None
        yield line


def _interval() -> float:
    from mars_cli.settings import env_number

    return env_number("MARS_PROGRESS_INTERVAL", 30.0, integer=False, minimum=0)


def duration(seconds: float) -> str:
    """1h02m, 2m03s, 4.2s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:.1f}"


# unit -> True when its rates read "s/unit": chosen by the first rate a process shows, then
# kept, so a long run's lines (a step of 0.8 s, then one of 1.3 s) never switch between
# "steps/s" and "s/step".
_PER_ITEM: dict[str, bool] = {}


def _rate(n: float, seconds: float, unit: str) -> str:
    per_item = _PER_ITEM.get(unit)
    if seconds <= 0 or n <= 0:
        return f"- s/{unit.rstrip('s') or unit}" if per_item else f"- {unit}/s"
    r = n / seconds
    if per_item is None:
        per_item = _PER_ITEM[unit] = r < 1
    if not per_item:
        return f"{r:.3g} {unit}/s" if r < 100 else f"{r:.0f} {unit}/s"
    return f"{1 / r:.3g} s/{unit.rstrip('s') or unit}"


_OPEN: "weakref.WeakSet[LogProgress]" = weakref.WeakSet()  # bars not yet closed


def stopped(e: BaseException) -> None:
    """Ctrl-C or SIGTERM ends the command (main.py): each bar still open prints what it did
    (one held by a loop that the signal interrupted outside the bar's own iteration too)."""
    for bar in list(_OPEN):
        bar._ended_by(e)


class LogProgress:
    """tqdm's interface, printing periodic plain lines (see the module docstring)."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
                 unit: str = "it", initial: float = 0, summary: bool = True, interval: float | None = None,
                 per_input: bool = False, **_ignored):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc or ""
        self.unit = unit.strip() or "it"
        self.n = initial
        self.postfix: str = ""
        self.summary = summary
        self.interval = _interval() if interval is None else interval
        self.start = self._last = _clock()
        self.closed = False
        self.per_input = per_input
        self.busy = 0.0  # per_input: seconds holding at least one unfinished record
        self._done_at = self.start  # per_input: when the last record was finished
        if per_input:
            _INPUT.counting += 1
        _OPEN.add(self)
        self._stop = threading.Event()
        if self.interval >= 1:  # a line even while nothing finishes (a stage waiting says so)
            threading.Thread(target=_tick, args=(weakref.ref(self), self._stop, self.interval), name="progress",
                             daemon=True).start()

    # tqdm's interface ---------------------------------------------------------------
    def __iter__(self) -> Iterator:
        # The summary only when the work ran to its end: a reader that went away
        # (`| head`) or an error ends the command without a "done" line.
        try:
            for x in self.iterable or ():
                yield x
                self.update(1)
        except BaseException as e:
            self._ended_by(e)
            raise
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._ended_by(exc)

    def _ended_by(self, e: BaseException | None) -> None:
        """Ended by an exception: an error says why itself; Ctrl-C or SIGTERM gets the summary
        of the work done so far (a stage stopped in a pipeline still says what it did)."""
        from mars_cli.errors import Terminated, stop_word

        if self.closed:
            return
        self._release()
        if isinstance(e, GeneratorExit) and Terminated.raised:
            e = Terminated()  # the loop over this bar was left by SIGTERM raised in its body
        if isinstance(e, KeyboardInterrupt):
            self._print(f"{self.final_line(_clock())}; {stop_word(e)}")

    def __len__(self) -> int:
        return int(self.total or 0)

    def update(self, n: float = 1) -> None:
        self.n += n
        now = _clock()
        if self.per_input:
            first = None
            for _ in range(int(n)):
                if not _INPUT.arrivals:
                    break
                t = _INPUT.arrivals.popleft()
                first = t if first is None else first
            # idle from the last record finished until this one arrived, busy after
            self.busy += max(0.0, now - max(self._done_at, first if first is not None else self._done_at))
            self._done_at = now
        if now - self._last >= self.interval:
            self._last = now
            self._print(self.line(now))

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k} {v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def reset(self, total: float | None = None) -> None:
        self.n, self.total = 0, total
        self.start = self._last = self._done_at = _clock()
        self.busy = 0.0

    def close(self) -> None:
        if self.closed:
            return
        self._release()
        if self.summary:
            self._print(self.final_line(_clock()))

    def _release(self) -> None:
        """Stop the ticker and stop counting input arrivals, printing nothing (the bar
        ended by an error or an abandoned iteration, or closed)."""
        if self.closed:
            return
        self.closed = True
        _OPEN.discard(self)
        self._stop.set()
        if self.per_input:
            _INPUT.counting -= 1
            if not _INPUT.counting:
                _INPUT.arrivals.clear()

    def _busy(self, elapsed: float) -> float:
        """The seconds the rate is over: all of them, or (per_input) the busy ones."""
        return self.busy if self.per_input else elapsed

    def waiting(self) -> bool:
        """Whether the stage holds nothing and waits for its next input record."""
        return self.per_input and not _INPUT.arrivals and _INPUT.blocked_since is not None

    # lines -----------------------------------------------------------------------------
    def _desc(self) -> str:
        """The description, unless it only repeats the command's name (`mars judge: judge …`)."""
        from mars_cli import streams

        return "" if self.desc == streams.current_program().split(" ")[-1] else self.desc

    def _prefix(self) -> str:
        return f"{self._desc()} " if self._desc() else ""

    def line(self, now: float) -> str:
        """`desc n/total unit (pct), rate, ETA …, elapsed …[, postfix]`."""
        elapsed = now - self.start
        count = f"{_num(self.n)}/{_num(self.total)} {self.unit}" if self.total else f"{_num(self.n)} {self.unit}"
        if self.waiting():
            waited = duration(now - max(self._done_at, _INPUT.blocked_since or now))
            parts = [f"{self._prefix()}waiting for input ({waited}), {count} in {duration(elapsed)}"]
            if self.n:
                parts.append(_rate(self.n, self.busy, self.unit) + " busy")
            return ", ".join(parts + ([self.postfix] if self.postfix else []))
        busy = self._busy(elapsed)
        parts = [self._prefix() + count]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(_rate(self.n, busy, self.unit) + (" busy" if self.per_input else ""))
        if self.total and self.n > 0:
            parts.append(f"ETA {duration(max(0.0, self.total - self.n) * elapsed / self.n)}")
        parts.append(f"elapsed {duration(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def final_line(self, now: float) -> str:
        elapsed = now - self.start
        head = f"{self._desc()}: " if self._desc() else ""
        tail = f"; {self.postfix}" if self.postfix else ""
        unit = self.unit[:-1] if self.n == 1 and self.unit.endswith("s") else self.unit  # "1 step", "2 steps"
        rate = _rate(self.n, self._busy(elapsed), self.unit)
        if self.per_input:  # how fast it works, and how long it waited for its input
            rate += f" busy; {duration(max(0.0, elapsed - self.busy))} waiting for input"
        return f"{head}{_num(self.n)} {unit} in {duration(elapsed)} ({rate}){tail}"

    @staticmethod
    def _print(line: str) -> None:
        from mars_cli import streams

        streams.warn(line)


def counting(items: Iterable, bar) -> Iterator:
    """`items`, each counted on `bar` when the next is asked for (the stage's work on it done)."""
    for item in items:
        yield item
        bar.update(1)


def _tick(ref, stop: threading.Event, interval: float) -> None:
    """A bar's periodic line while no unit finishes; ends with the bar (closed, or dropped unclosed)."""
    while not stop.wait(interval / 4):
        bar = ref()
        if bar is None or bar.closed:
            return
        now = _clock()
        if now - bar._last >= interval:
            bar._last = now
            bar._print(bar.line(now))
        del bar


def count_lines(paths) -> int | None:
    """Lines in these files (a progress total); None when reading stdin or a file is missing."""
    if not paths:
        return None
    n = 0
    try:
        for p in paths:
            if str(p) == "-":
                return None
            with open(p, "rb") as f:
                last = b"\n"
                while block := f.read(1 << 20):
                    n += block.count(b"\n")
                    last = block[-1:]
                n += last != b"\n"
    except OSError:
        return None
    return n
