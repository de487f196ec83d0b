"""The LLM judge's client pool under N concurrent records against a stand-in OpenAI server.

Every record is asked once and answered with its own verdict: nothing lost, nothing
duplicated, no error, including when the server refuses a few requests with a 503 in the
middle of the run (they are retried) and when the same records are judged again.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import pytest

from fakeservers import FakeServer, openai_routes
from mars_cli.rl.llm_judge import AsyncJudge

pytestmark = pytest.mark.network
N = 200


def reply(prompt: str) -> str:
    """Yes when the candidate says "right"; the question id is echoed so answers can't cross."""
    qid = re.search(r"question-(\d+)", prompt).group(1)
    ok = "right" in prompt.split("Candidate answer:", 1)[1]
    return f"case {qid}: <verdict>{'yes' if ok else 'no'}</verdict>"


def test_judge_pool_answers_n_concurrent_records_once_each():
    records = [(f"question-{i}", [f"gold {i}"], f"{'right' if i % 3 else 'wrong'} {i}") for i in range(N)]
    with FakeServer(openai_routes(reply)) as srv:
        async def round_(faults: int):
            async with AsyncJudge(f"{srv.url}/v1", "m", rubric="strict", concurrency=16, timeout=30, retries=3,
                                  backoff=0.01) as j:
                async def one(i, q, g, p):
                    if i == N // 2:
                        srv.faults.extend([("status", 503)] * faults)  # a refusal burst in the middle
                    return await j.judge(q, g, p)

                return await asyncio.gather(*(one(i, *r) for i, r in enumerate(records)))

        first = asyncio.run(round_(faults=5))
        calls_first = len(srv.calls)
        again = asyncio.run(round_(faults=0))
    for i, v in enumerate(first):
        assert v.error is None and v.accuracy == (1.0 if i % 3 else 0.0), (i, v)
        assert v.raw.startswith(f"case {i}:")
    assert [(v.accuracy, v.raw) for v in again] == [(v.accuracy, v.raw) for v in first]
    asked = Counter(re.search(r"question-(\d+)", c["json"]["messages"][-1]["content"]).group(1) for c in srv.calls)
    assert calls_first == N + 5 and len(srv.calls) == 2 * N + 5  # one call each, plus the 5 refused and retried
    assert set(asked) == {str(i) for i in range(N)} and sum(asked.values()) == 2 * N + 5
