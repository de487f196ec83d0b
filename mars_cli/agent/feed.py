"""What feeds the agent loop: lazy input, `--loop` passes, and the `--max-staleness` gate.

The input is read on a daemon thread, a bounded number of records ahead of need (as many
as can run at once), so a slow pipe never blocks the event loop, a run's first episodes
start together (and share the engine's first batch), and the input is never read whole
before episodes start. A reader
blocked on a silent stdin cannot hold the process open after the run ends.
"""

from __future__ import annotations

import asyncio
import random
import threading
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Iterable, Iterator

from mars_cli import streams
from mars_cli.errors import MarsError, UsageError


class _Items:
    def __init__(self, queue: asyncio.Queue, space: threading.Semaphore):
        self._q = queue
        self._space = space
        self._done = False

    async def next(self):
        """The next record; StopAsyncIteration at the end; the reader's exception re-raised."""
        if self._done:
            raise StopAsyncIteration
        kind, value = await self._q.get()
        self._space.release()
        if kind == "item":
            return value
        self._done = True
        if kind == "error":
            raise value
        raise StopAsyncIteration


@asynccontextmanager
async def prefetch(iterable: Iterable, ahead: int = 64) -> AsyncIterator[_Items]:
    """Iterate `iterable` on a reader thread, at most `ahead` records ahead; `await items.next()`."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    space = threading.Semaphore(max(1, ahead))
    stop = threading.Event()

    def produce() -> None:
        it = iter(iterable)
        while not stop.is_set():
            try:
                item = ("item", next(it))
            except StopIteration:
                item = ("end", None)
            except Exception as e:  # noqa: BLE001 — handed to the loop, which decides
                item = ("error", e)
            while not space.acquire(timeout=0.2):
                if stop.is_set():
                    return
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody wants more input
                return
            if item[0] != "item":
                return

    reader = threading.Thread(target=produce, name="mars-input", daemon=True)
    reader.start()
    try:
        yield _Items(q, space)
    finally:
        stop.set()


def passes(read: Callable[[], Iterator[dict]], *, stdin: bool, seed: int | None, forever: bool) -> Iterator[dict]:
    """The task records of one pass, or (`forever`) of pass after pass, each with `epoch`.

    Pass 0 streams the input in its order. Later passes re-read the files (stdin: the
    records buffered in pass 0) and shuffle them with a generator seeded by (seed, pass).
    """
    if not forever:
        yield from read()
        return
    kept: list[dict] | None = [] if stdin else None
    count = 0
    for rec in read():
        count += 1
        if kept is not None:
            kept.append(rec)
        yield {**rec, "epoch": 0}
    if count == 0:
        raise MarsError("--loop: the input has no tasks")
    epoch = 1
    while True:
        recs = list(kept) if kept is not None else list(read())
        if not recs:
            raise MarsError("--loop: the input has no tasks")
        random.Random(f"{seed}:{epoch}").shuffle(recs)
        for rec in recs:
            yield {**rec, "epoch": epoch}
        epoch += 1


def epoch_group(rec: dict) -> str:
    """Groups of different passes must not merge downstream: `id@epoch`."""
    return f"{rec['id']}@{rec['epoch']}" if "epoch" in rec else str(rec["id"])


class InputEnd(Exception):
    """Raised by an `admit` gate: start no more groups, cancel the running ones, end the run."""


class StalenessGate:
    """Holds back new groups while rollout runs more than `max_staleness` batches ahead.

    Groups are numbered as they start; group k belongs to batch k // batch_groups. With
    v0 the weight version at the start and v the current one, batch b may start once
    b - (v - v0) <= max_staleness: 0 is fully on-policy (each batch waits for the update
    of the one before), 1 lets rollout sample batch b+1 while batch b trains.

    The servers also report the trainer's lease (serve/lease.py). Once the trainer that
    followed them is done or lost, no weights will come: the gate raises InputEnd, and
    the rollout ends instead of waiting forever (`update --follow --max-steps N`, with
    `tee` between the stages, or a trainer killed). A trainer that had already ended when
    the rollout started is a previous run's, and is waited past. While the trainer is
    "stalled" (its last push failed), the weights waited for will not come until it trains
    on another batch: the batch goes ahead, over --max-staleness, and says so.
    """

    def __init__(self, engine, batch_groups: int, max_staleness: int, poll: float = 1.0):
        if batch_groups < 1:
            raise UsageError(f"--batch-groups must be at least 1, got {batch_groups}")
        if max_staleness < 0:
            raise UsageError(f"--max-staleness must be >= 0, got {max_staleness}")
        self.engine = engine
        self.batch_groups = batch_groups
        self.max_staleness = max_staleness
        self.poll = poll
        self.base: int | None = None
        self.waits = 0
        self.overrun = 0  # batches sent ahead of their weights while the trainer was stalled
        self._stale: set = set()  # ids of trainers that had ended before this run began

    def _ended(self) -> str | None:
        """Why no new weights will come, or None while a trainer follows (or none has yet)."""
        states = [t for t in (getattr(self.engine, "trainers", None) or {}).values()
                  if isinstance(t, dict) and t.get("id") not in self._stale]
        if not states or any(t.get("state") in ("following", "stalled") for t in states):
            return None
        how = {"done": "ended", "lost": "stopped calling its servers (killed?)"}
        t = states[0]
        return f"the trainer {how.get(t.get('state'), t.get('state'))}: no new weights will come; ending"

    def _stalled(self) -> bool:
        return any(isinstance(t, dict) and t.get("state") == "stalled" and t.get("id") not in self._stale
                   for t in (getattr(self.engine, "trainers", None) or {}).values())

    async def __call__(self, k: int) -> None:
        batch = k // self.batch_groups
        if self.base is None:
            self.base = await self.engine.apoll_weight_version()
            if self.base is None:
                raise MarsError("--batch-groups/--max-staleness need an engine whose weights change (--server)")
            self._stale = {t.get("id") for t in (getattr(self.engine, "trainers", None) or {}).values()
                           if isinstance(t, dict) and t.get("state") in ("done", "lost")}
        announced = False
        while True:
            v = await self.engine.apoll_weight_version()
            ended = self._ended()
            if ended is not None:
                raise InputEnd(ended)
            if v is not None and batch - (v - self.base) <= self.max_staleness:
                return
            if self._stalled():
                self.overrun += 1
                streams.warn(f"batch {batch} goes ahead on weight version {v}, over --max-staleness "
                             f"{self.max_staleness}: the trainer's last push failed, and it pushes again "
                             "only after training on another batch")
                return
            if not announced:
                self.waits += 1
                streams.warn(f"batch {batch} waits for new weights (weight version {v}, "
                             f"--max-staleness {self.max_staleness})")
                announced = True
            await asyncio.sleep(self.poll)
