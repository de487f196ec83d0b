"""Mini-batches, rank shards and token-budget packing (pure Python)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from mars_cli.rl import batching


@given(st.lists(st.integers(1, 500), min_size=1, max_size=40), st.integers(1, 2000))
def test_pack_uses_every_index_once_within_the_budget(lengths, budget):
    groups = batching.pack(range(len(lengths)), lengths.__getitem__, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        padded = len(g) * max(lengths[i] for i in g)
        assert padded <= budget or len(g) == 1  # too long for the budget: alone


def test_minibatches_and_shards_cover_the_batch():
    assert batching.minibatches(5, None) == [[0, 1, 2, 3, 4]]
    assert batching.minibatches(5, 2) == [[0, 1], [2, 3], [4]]
    mb = list(range(7))
    shards = [batching.shard(mb, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert batching.pack([3, 1, 2], {1: 10, 2: 30, 3: 20}.__getitem__, 60) == [[2, 3], [1]]


def test_rank_plans_have_equal_lengths_and_put_image_micro_batches_first():
    lengths = [100, 100, 100, 100, 100]
    plans = [batching.rank_plan(range(5), lengths, 100, r, 2) for r in range(2)]
    assert [len(p) for p in plans] == [3, 3]
    assert plans[1][-1][1] == 0.0 and all(w == 1.0 for _, w in plans[0])  # rank 1 repeats one, weight 0
    assert sorted(i for p in plans for g, w in p if w for i in g) == [0, 1, 2, 3, 4]
    # Rank 0 holds 0, 2, 4 and rank 1 holds 1, 3; only 4 and 3 have images: both run them first.
    images = [False, False, False, True, True]
    plans = [batching.rank_plan(range(5), lengths, 100, r, 2, has_images=images) for r in range(2)]
    assert [p[0][0] for p in plans] == [[4], [3]]
    assert sorted(i for p in plans for g, w in p if w for i in g) == [0, 1, 2, 3, 4]
