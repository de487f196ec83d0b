"""`mars serve --engine hf` with many clients at once, a /load among them, and a shutdown while busy."""

from __future__ import annotations

import asyncio
import base64
import shutil
import signal
import threading
import time

import httpx
import pytest

from helpers_rollout import make_image
from test_serve_hardening import GEN, Served, gen_body, served  # noqa: F401 (served: a fixture)

pytestmark = pytest.mark.network


@pytest.mark.slow
def test_five_rounds_of_48_concurrent_episodes_sharing_a_fresh_image_lose_none(served, tiny_policy_dir, tmp_path):
    from mars_cli.agent.loop import AgentLoop, Limits
    from mars_cli.agent.run import open_toolbox
    from mars_cli.engines import Sampling, open_engine

    eng = open_engine("server", policy=None, sampling=Sampling(temperature=1.0), urls=[served.url])
    loop = AgentLoop(eng, open_toolbox(tmp_path / "art", search_backend="local"), max_inflight=48,
                     limits=Limits(max_turns=1, max_total_tokens=2048, max_new_tokens=2))
    for r in range(5):
        img = make_image(tmp_path / f"round{r}.jpg", size=(64 + 8 * r, 48), color=(10 * r, 90, 200))
        tasks = [{"schema_version": 1, "id": f"r{r}-t{i}", "question": "What colour?", "images": [img],
                  "answers": ["red"]} for i in range(48)]
        recs = loop.run(tasks)
        assert sorted(rec["id"] for rec in recs) == sorted(t["id"] for t in tasks)  # none lost, none twice
        bad = [(rec["id"], rec["finish"], rec.get("error")) for rec in recs if rec["finish"] == "error"]
        assert bad == []
        assert all(sum(rec["tokens"]["mask"]) > 0 for rec in recs)
    st = httpx.get(served.url + "/health").json()["stats"]
    assert st["requests"] >= 5 * 48


@pytest.mark.slow
def test_clients_repeating_the_same_inputs_with_a_load_in_the_middle_lose_nothing(tiny_policy_dir, tmp_path):
    from mars_cli.models.tiny import make_tiny_model

    shutil.copytree(tiny_policy_dir, tmp_path / "ck")
    ck2 = make_tiny_model(tmp_path / "ck2", arch="qwen2.5-vl", seed=1)
    s = Served(tmp_path / "ck")
    clients, repeats = 8, 6
    try:
        h = httpx.get(s.url + "/health").json()
        img = make_image(tmp_path / "shared.jpg", size=(64, 48))
        part = {"type": "image_url", "url": "data:image/jpeg;base64," + base64.b64encode(open(img, "rb").read()).decode()}
        pad = 151655  # <|image_pad|>

        async def client(c, k):
            out = []
            for r in range(repeats):
                body = gen_body({"max_tokens": 3, "temperature": 1.0}, ids=[1, pad, 2, 3], content_parts=[part],
                                request_id=f"c{k}-r{r}")
                out.append(await c.post(s.url + GEN, json=body))
            return out

        async def load_midway(c):
            await asyncio.sleep(0.5)
            return await c.post(s.url + "/load", json={"path": str(ck2)})

        async def main():
            async with httpx.AsyncClient(timeout=300) as c:
                return await asyncio.gather(load_midway(c), *(client(c, k) for k in range(clients)))

        loaded, *answers = asyncio.run(main())
        assert h["stats"]["requests"] == 0 and loaded.status_code == 200, loaded.text
        got = [r for rs in answers for r in rs]
        assert [r.status_code for r in got] == [200] * clients * repeats, [r.text for r in got if r.status_code != 200]
        ids = [r.json()["request_id"] for r in got]
        assert sorted(ids) == sorted(f"c{k}-r{r}" for k in range(clients) for r in range(repeats))  # none lost or twice
        versions = [r.json()["mars"]["weight_version"] for r in got]
        assert set(versions) <= {1, 2} and all(len(r.json()["choices"][0]["token_ids"]) >= 1 for r in got)
        for rs in answers:  # one client's answers never go back to older weights
            v = [r.json()["mars"]["weight_version"] for r in rs]
            assert v == sorted(v)
        st = httpx.get(s.url + "/health").json()
        probed = "error" not in (loaded.json().get("probe") or {"error": None})  # /load's push probe generates too
        assert st["weight_version"] == 2 and st["stats"]["requests"] == clients * repeats + probed
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.stderr, s.stderr


def _busy(s, max_tokens):
    """Start one long generation on a thread; (thread, box) with its response once answered."""
    box = {}

    def go():
        try:
            box["r"] = httpx.post(s.url + GEN, json=gen_body({"max_tokens": max_tokens}), timeout=300)
        except httpx.HTTPError as e:
            box["e"] = e

    t = threading.Thread(target=go)
    t.start()
    time.sleep(1.5)  # sent and taken by the batcher (the drain log says so either way)
    return t, box


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_says_so(tiny_policy_dir):
    s = Served(tiny_policy_dir, "--drain-timeout", 120)
    t, box = _busy(s, 300)
    assert s.stop(signal.SIGTERM, timeout=200) == 0
    t.join(60)
    assert "finishing 1 in-flight request" in s.stderr, s.stderr
    assert box["r"].status_code == 200 and len(box["r"].json()["choices"][0]["token_ids"]) >= 1
    assert "cut off" not in s.stderr and "Traceback" not in s.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_drain_timeout_bounds_the_wait_for_a_busy_server(tiny_policy_dir, sig):
    s = Served(tiny_policy_dir, "--drain-timeout", 1)
    t, box = _busy(s, 30_000)  # minutes of generation on a CPU
    t0 = time.monotonic()
    assert s.stop(sig, timeout=120) == 0
    waited = time.monotonic() - t0
    t.join(60)
    assert "finishing 1 in-flight request" in s.stderr and "cut off" in s.stderr, s.stderr
    assert "e" in box or box["r"].status_code != 200
    assert waited < 60 and "Traceback" not in s.stderr
