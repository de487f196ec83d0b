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


def test_gate_ends_when_the_trainer_following_the_servers_ends():
    """A previous run's ended trainer is waited past; this run's trainer done or lost ends the wait."""
    eng = VersionEngine()
    eng.trainers = {"http://a": {"id": "old", "state": "done", "seconds": 90.0}}
    gate = feed.StalenessGate(eng, batch_groups=1, max_staleness=0, poll=0.01)

    async def scenario(final: str, said: str):
        await gate(0)
        waiter = asyncio.create_task(gate(1))  # waits for the weights of batch 0
        await asyncio.sleep(0.05)
        assert not waiter.done()  # "old" ended before this run: not the trainer it waits for
        eng.trainers = {"http://a": {"id": "new", "state": "following", "seconds": 0.1}}
        await asyncio.sleep(0.05)
        assert not waiter.done()
        eng.trainers = {"http://a": {"id": "new", "state": final, "seconds": 0.1}}
        with pytest.raises(feed.InputEnd, match=said):
            await asyncio.wait_for(waiter, 1)

    asyncio.run(scenario("done", "the trainer ended: no new weights will come"))
    eng.trainers = {}
    gate = feed.StalenessGate(eng, batch_groups=1, max_staleness=0, poll=0.01)
    asyncio.run(scenario("lost", "stopped calling its servers"))


def test_trainer_lease_reports_following_done_and_lost():
    from mars_cli.serve.http import HTTPError
    from mars_cli.serve.lease import TrainerLease

    class Req:
        def __init__(self, body):
            self.body = body

        def json(self):
            return self.body

    now = [100.0]
    lease = TrainerLease(clock=lambda: now[0])
    assert lease.describe() is None  # no trainer has called: a rollout waits as before

    def post(body):
        return asyncio.run(lease.post(Req(body)))

    assert post({"id": "t1", "state": "following", "lease": 10}) == (200, {"id": "t1", "state": "following", "seconds": 0.0})
    now[0] += 9.5
    assert lease.describe()["state"] == "following"
    now[0] += 1
    assert lease.describe() == {"id": "t1", "state": "lost", "seconds": 10.5}  # killed: no call within the lease
    post({"id": "t1", "state": "stalled", "lease": 10})
    assert lease.describe()["state"] == "stalled"  # its last push failed
    now[0] += 11
    assert lease.describe()["state"] == "lost"  # killed while stalled
    post({"id": "t1", "state": "following", "lease": 10})
    post({"id": "t1", "state": "done"})
    now[0] += 1000
    assert lease.describe()["state"] == "done"
    for bad in ([], {"state": "following"}, {"id": "t", "state": "asleep"}, {"id": "t", "state": "done", "lease": 0},
                {"id": "x" * 65, "state": "done"}, {"id": "t", "state": "done", "lease": True}):
        with pytest.raises(HTTPError):
            post(bad)


def test_gate_lets_a_batch_ahead_while_the_trainer_is_stalled():
    """The trainer's last push failed: the weights waited for come only after it trains on
    another batch, so the batch goes ahead, over --max-staleness, and says so."""
    eng = VersionEngine()
    eng.trainers = {"http://a": {"id": "t", "state": "following", "seconds": 0.1}}
    gate = feed.StalenessGate(eng, batch_groups=1, max_staleness=0, poll=0.01)

    async def scenario():
        await gate(0)
        waiter = asyncio.create_task(gate(1))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # following: batch 1 waits for batch 0's weights
        eng.trainers = {"http://a": {"id": "t", "state": "stalled", "seconds": 0.1}}
        await asyncio.wait_for(waiter, 1)
        assert gate.overrun == 1

    asyncio.run(scenario())
    # a rollout started while the trainer is stalled counts it as this run's trainer
    gate = feed.StalenessGate(eng, batch_groups=1, max_staleness=0, poll=0.01)
    asyncio.run(gate(0))
    assert gate._stale == set()
