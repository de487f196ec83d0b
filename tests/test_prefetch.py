"""Inputs of the next micro-batch built in a background thread (rl.prefetch)."""

from __future__ import annotations

import threading

import pytest
import torch

import helpers_train as H
from mars_cli.errors import MarsError
from mars_cli.rl import batching, prefetch


@pytest.fixture(scope="module")
def setup(tiny_policy_dir, tmp_path_factory):
    from mars_cli.jsonl import read_located
    from mars_cli.models.load import load_policy

    d = tmp_path_factory.mktemp("prefetch")
    path = H.write_batch(tiny_policy_dir, d / "b.jsonl", [1.0, -1.0, 0.5], image_dir=d)
    policy = load_policy(tiny_policy_dir)
    return policy, batching.update_examples(read_located([str(path)]), policy.special["image_pad"])


def test_a_prefetched_batch_is_the_inline_batch_built_in_another_thread(setup, monkeypatch):
    policy, exs = setup
    threads = []
    real = prefetch.build_for
    monkeypatch.setattr(prefetch, "build_for", lambda *a, **k: threads.append(threading.current_thread().name) or real(*a, **k))
    p = prefetch.InputPrefetcher()
    try:
        assert p.take(policy, exs[:2]) is None  # nothing submitted
        p.submit(policy, exs[:2])
        got = p.take(policy, exs[:2])
        want = real(policy, exs[:2])
        assert threads and threads[0].startswith("mars-prefetch")
        assert got.tensors.keys() == want.tensors.keys() and got.lengths == want.lengths
        for k in want.tensors:
            assert torch.equal(got.tensors[k], want.tensors[k]), k
        assert p.take(policy, exs[:2]) is None  # taken once
    finally:
        p.close()


def test_a_build_error_is_raised_by_the_step_that_needs_it(setup, tmp_path):
    policy, exs = setup
    broken = batching.Example(exs[0].ids, exs[0].mask, [str(tmp_path / "gone.png")], 1.0)
    p = prefetch.InputPrefetcher()
    try:
        p.submit(policy, [broken])  # no error yet
        with pytest.raises(MarsError):
            p.take(policy, [broken])
    finally:
        p.close()


def test_micro_logprobs_with_upcoming_uses_the_prefetched_input(setup):
    policy, exs = setup
    groups = [([0], 1.0), ([1, 2], 1.0)]
    plain = [batching.micro_logprobs(policy, [exs[i] for i in g])[0] for g, _ in groups]
    before = prefetch.PREFETCHER.hits
    got = [batching.micro_logprobs(policy, [exs[i] for i in g], upcoming=batching.upcoming(exs, groups, j))[0]
           for j, (g, _) in enumerate(groups)]
    assert prefetch.PREFETCHER.hits == before + 1  # the second micro-batch came ready-made
    for a, b in zip(plain, got):
        assert torch.equal(a, b)
    assert batching.upcoming(exs, groups, 1) is None
