"""What feeds the loop: --loop passes, the --max-staleness gate, lazy input."""

from __future__ import annotations

import asyncio

import pytest

from mars_cli.agent import feed
from mars_cli.errors import MarsError, UsageError


def test_passes_stream_then_reshuffle_by_seed():
    recs = [{"id": f"t{i}"} for i in range(6)]
    reads = []

    def read():
        reads.append(1)
        return iter(recs)

    it = feed.passes(read, stdin=False, seed=3, forever=True)
    got = [next(it) for _ in range(18)]
    assert [r["id"] for r in got[:6]] == [r["id"] for r in recs] and {r["epoch"] for r in got[:6]} == {0}
    p1, p2 = [r["id"] for r in got[6:12]], [r["id"] for r in got[12:]]
    assert sorted(p1) == sorted(p2) == sorted(r["id"] for r in recs) and p1 != p2
    assert len(reads) == 3  # files are read again each pass
    again = feed.passes(read, stdin=False, seed=3, forever=True)
    assert [next(again)["id"] for _ in range(12)][6:] == p1  # the same seed, the same order
    assert feed.epoch_group(got[7]) == f"{got[7]['id']}@1"
    # stdin is read once and buffered
    reads.clear()
    it = feed.passes(read, stdin=True, seed=0, forever=True)
    [next(it) for _ in range(13)]
    assert len(reads) == 1
    with pytest.raises(MarsError, match="no tasks"):
        next(feed.passes(lambda: iter([]), stdin=True, seed=0, forever=True))


class VersionEngine:
    def __init__(self):
        self.version = 5

    async def apoll_weight_version(self):
        return self.version


def test_staleness_gate_holds_new_groups_until_weights_catch_up():
    eng = VersionEngine()
    gate = feed.StalenessGate(eng, batch_groups=2, max_staleness=1, poll=0.01)

    async def scenario():
        await gate(0)
        await gate(3)  # batch 1: one ahead, allowed
        waiter = asyncio.create_task(gate(4))  # batch 2: two ahead of version 5
        await asyncio.sleep(0.05)
        assert not waiter.done()
        eng.version = 6  # batch 0 trained and pushed
        await asyncio.wait_for(waiter, 1)
        await gate(5)

    asyncio.run(scenario())
    assert gate.waits == 1
    with pytest.raises(UsageError):
        feed.StalenessGate(eng, batch_groups=0, max_staleness=1)

    class Fixed:
        async def apoll_weight_version(self):
            return None

    with pytest.raises(MarsError, match="--server"):
        asyncio.run(feed.StalenessGate(Fixed(), batch_groups=1, max_staleness=0)(0))


def test_prefetch_reads_lazily_and_hands_over_errors():
    seen = []

    def gen():
        for i in range(100):
            seen.append(i)
            if i == 3:
                raise MarsError("tasks.jsonl:4: invalid JSON")
            yield i

    async def scenario():
        got = []
        async with feed.prefetch(gen(), ahead=2) as items:
            got.append(await items.next())
            await asyncio.sleep(0.05)
            assert len(seen) <= 4  # not the whole input: at most `ahead` beyond what was taken
            with pytest.raises(MarsError, match="tasks.jsonl:4"):
                while True:
                    got.append(await items.next())
        return got

    assert asyncio.run(scenario()) == [0, 1, 2]
