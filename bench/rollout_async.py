"""Benchmark the asynchronous agent loop against the lock-step one it replaced.

    .venv/bin/python bench/rollout_async.py [--engine server|inproc] [--episodes 48] [--concurrency 16]
                                            [--new-tokens 16] [--seed 0] [--quick]

The policy is the tiny Qwen2.5-VL made locally (CPU), behind `mars serve --engine hf`
(`--engine server`, the default: started here on 127.0.0.1, then reached over HTTP by the
`server` engine) or in-process (`--engine inproc`: the hf engine's own micro-batching).
Both loops drive the SAME engine at the SAME concurrency C:
  lock-step  bench/lockstep_loop.py, the loop mars used before: one batched generate per
             turn for the C live episodes, then it waits for all of their tool calls
             (over a server, the batch is C concurrent requests, which the server batches);
  async      mars_cli.agent.loop: every episode its own task, its next turn requested the
             moment its tool result is back (`--max-inflight C`).
Episodes are uneven: each task is given 1–6 turns (seeded). Every turn is a real
generation of --new-tokens tokens by the model (its ids are kept, so prompts grow as in a
real episode); only the turn's TEXT is scripted (a text-search call, or the answer at the
last turn), so both loops run exactly the same episodes. The search tool only sleeps: its
latency is drawn per (task, turn) from a seeded log-normal (median 200 ms, σ = ln 10 / 2.326,
so p99 ≈ 2 s), the same draws in both runs; a second pass uses a fixed 200 ms.

Reported, per latency model: both wall times and their ratio (target ≥ 2× for the
log-normal), the mean time G of one lock-step generate call, and for the fixed latency T the
ceiling (G + T) / max(G, T) that overlapping generation with tools can reach; and the
engine's idle fraction: the share of the run's wall time with no request in flight at the
engine, over the whole run and over its steady part, until the last episode has started
(after that fewer than C episodes are left, and a few long tool calls end every run); the
target, ≤ 10% while episodes wait for tools, is the async loop's steady figure. A table on
stderr, one JSON line on stdout.

Regime: on this CPU one batched generate takes G ≈ 0.5 s with the default tiny model
(--vocab 2048, 8 new tokens); the full 152k vocabulary (--vocab 151643) makes G several
seconds, generation then dominates and the gain shrinks toward the ceiling. What matters
is the ratio of G to the tool latency, reported beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SIGMA = math.log(10) / 2.326  # log-normal: p99 / median = 10


class Latency:
    """Seeded tool latency per (task, turn): the same draw whichever loop asks, in any order."""

    def __init__(self, kind: str, seed: int):
        self.kind, self.seed = kind, seed

    def __call__(self, key: str) -> float:
        if self.kind == "fixed":
            return 0.2
        rng = random.Random(f"{self.seed}:{key}")
        return min(8.0, 0.2 * math.exp(SIGMA * rng.gauss(0.0, 1.0)))


class SleepSearch:
    """A text-search backend that only waits (the tool's latency, nothing else)."""

    def __init__(self, latency: Latency):
        self.latency = latency

    def search(self, query: str, k: int = 5) -> list[dict]:
        time.sleep(self.latency(query))
        return [{"rank": 1, "title": "Result", "text": f"about {query}", "doc_id": "0", "score": 1.0, "backend": "sleep"}]


class Meter:
    """Busy time of the engine: wall time with at least one request in flight."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inflight = 0
        self.since = 0.0
        self.busy = 0.0
        self.spans: list[tuple[float, float]] = []
        self.calls: list[float] = []
        self.last_start = 0.0  # when the last episode got its first turn: the run drains after it

    def busy_until(self, t0: float, t1: float) -> float:
        return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in self.spans)

    def enter(self):
        with self.lock:
            if self.inflight == 0:
                self.since = time.perf_counter()
            self.inflight += 1

    def leave(self):
        with self.lock:
            self.inflight -= 1
            if self.inflight == 0:
                now = time.perf_counter()
                self.busy += now - self.since
                self.spans.append((self.since, now))


def scripted(turns: dict, meter: Meter):
    """The text of each turn: search calls, then the answer at the task's last turn."""
    from mars_cli import protocol

    def text(messages) -> str:
        q = messages[1]["content"][-1]["text"]
        task = q.split()[1]
        k = sum(m["role"] == "assistant" for m in messages)
        if k == 0:
            meter.last_start = max(meter.last_start, time.perf_counter())
        if k + 1 >= turns[task]:
            return protocol.format_assistant("done", answer="x")
        return protocol.format_assistant("look up", call=(protocol.TEXT_SEARCH, {"query": f"{task}:{k}"}))
    return text


def bench_engine(inner, text, meter: Meter, bg_loop):
    """An Engine with `inner`'s tokens and timing, whose turn text comes from `text`."""
    from mars_cli.engines import Engine

    class Bench(Engine):
        name = inner.name
        tokens = True

        def __init__(self):
            for a in ("path", "fingerprint", "sampling", "renderer", "special", "max_images", "weight_version", "pixels"):
                setattr(self, a, getattr(inner, a, None))

        def image_tokens(self, image):
            return inner.image_tokens(image)

        async def aclose(self):
            if hasattr(inner, "aclose"):
                await inner.aclose()

        def _script(self, req, res):
            res.text = text(req.messages)
            return res

        async def agenerate(self, req):  # the async loop
            meter.enter()
            try:
                return self._script(req, await inner.agenerate(req))
            finally:
                meter.leave()

        def generate(self, reqs):  # the lock-step loop: one batch per turn
            t0 = time.perf_counter()
            for _ in reqs:
                meter.enter()
            try:
                if bg_loop is None:
                    res = inner.generate(reqs)
                else:  # over HTTP: the batch is concurrent requests, on one long-lived loop
                    async def batch():
                        return await asyncio.gather(*(inner.agenerate(r) for r in reqs))
                    res = asyncio.run_coroutine_threadsafe(batch(), bg_loop).result()
            finally:
                for _ in reqs:
                    meter.leave()
            meter.calls.append(time.perf_counter() - t0)
            return [self._script(q, r) for q, r in zip(reqs, res)]

    return Bench()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, log: Path):
    import urllib.request

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mars_cli", "serve", "--policy", str(model), "--engine", "hf",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mars serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("mars serve did not become healthy in 180 s")


def run_pair(open_inner, tasks, turns, latency: Latency, *, concurrency: int, new_tokens: int, tmp: Path,
             server: bool) -> dict:
    from lockstep_loop import AgentLoop as LockStep
    from lockstep_loop import Limits as OldLimits
    from mars_cli.agent.loop import AgentLoop, Limits
    from mars_cli.agent.toolbox import Toolbox

    out = {}
    for name in ("lockstep", "async"):
        meter = Meter()
        tb = Toolbox(tmp / "art", text_search=SleepSearch(latency))
        bg = None
        if server and name == "lockstep":
            bg = asyncio.new_event_loop()
            threading.Thread(target=bg.run_forever, daemon=True).start()
        inner = open_inner() if server else open_inner.cached
        eng = bench_engine(inner, scripted(turns, meter), meter, bg)
        t0 = time.perf_counter()
        if name == "lockstep":
            loop = LockStep(eng, tb, limits=OldLimits(max_turns=8, max_new_tokens=new_tokens, max_total_tokens=10**6),
                            batch_size=concurrency, tool_workers=concurrency)
            recs = list(loop.run(tasks))
        else:
            loop = AgentLoop(eng, tb, limits=Limits(max_turns=8, max_new_tokens=new_tokens, max_prompt_tokens=10**6,
                                                    max_response_tokens=10**6),
                             max_inflight=concurrency, tool_workers=concurrency)
            recs = loop.run(tasks)
        wall = time.perf_counter() - t0
        if bg is not None:
            asyncio.run_coroutine_threadsafe(inner.aclose(), bg).result()
            bg.call_soon_threadsafe(bg.stop)
        bad = [r for r in recs if r["finish"] != "answer"]
        if len(recs) != len(tasks) or bad:
            raise SystemExit(f"{name}: {len(recs)} records, {len(bad)} not answered: {bad[:1]}")
        assert sorted(r["turns"] for r in recs) == sorted(turns.values())
        steady = meter.last_start - t0
        out[name] = {"wall_s": round(wall, 3), "idle_fraction": round(1 - meter.busy / wall, 4),
                     "idle_fraction_steady": round(1 - meter.busy_until(t0, meter.last_start) / steady, 4),
                     "generate_calls": len(meter.calls),
                     "mean_generate_s": round(sum(meter.calls) / len(meter.calls), 4) if meter.calls else None}
    out["ratio"] = round(out["lockstep"]["wall_s"] / out["async"]["wall_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("server", "inproc"), default="server")
    ap.add_argument("--episodes", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048, help="tiny model's vocabulary (small: G well under T)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="a tiny model directory (default: made here)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    ap.add_argument("--quick", action="store_true", help="24 episodes, concurrency 8")
    a = ap.parse_args()
    if a.quick:
        a.episodes, a.concurrency = 24, 8
    # Same threads for both loops: on a loaded machine, OpenMP teams of 2+ threads measured
    # 7× slower in the main thread (the lock-step loop's) than on a worker (the async one's).
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)

    from mars_cli.engines import Sampling, open_engine
    from mars_cli.records import make_task
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="mars-bench-async-"))
    model = Path(a.model) if a.model else tmp / "tiny"
    if not a.model:
        from mars_cli.models.tiny import make_tiny_model

        make_tiny_model(model, vocab=a.vocab)
    img = tmp / "img.png"
    Image.new("RGB", (56, 56), (120, 30, 200)).save(img)
    rng = random.Random(a.seed)
    turns = {f"e{i}": rng.randint(1, 6) for i in range(a.episodes)}
    tasks = [make_task(t, f"Episode {t} : what is shown?", images=[str(img)]) for t in turns]
    sampling = Sampling(temperature=1.0, seed=a.seed)
    proc = None
    try:
        if a.engine == "server":
            proc, url = start_server(model, tmp / "serve.log")

            def open_inner():
                return open_engine("server", policy=None, sampling=sampling, urls=[url])
        else:
            def open_inner():
                return None
            open_inner.cached = open_engine("hf", policy=str(model), sampling=sampling, max_batch=a.concurrency)
        figures = {"engine": a.engine, "vocab": a.vocab, "episodes": a.episodes, "concurrency": a.concurrency, "new_tokens": a.new_tokens,
                   "turns": sum(turns.values())}
        for kind in ("lognormal", "fixed"):
            figures[kind] = run_pair(open_inner, tasks, turns, Latency(kind, a.seed), concurrency=a.concurrency,
                                     new_tokens=a.new_tokens, tmp=tmp, server=a.engine == "server")
        g = figures["fixed"]["lockstep"]["mean_generate_s"]
        figures["fixed"]["ceiling"] = round((g + 0.2) / max(g, 0.2), 3)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    w = sys.stderr.write
    w(f"rollout_async: {a.episodes} episodes ({figures['turns']} turns), concurrency {a.concurrency}, engine {a.engine}\n")
    w(f"{'latency':<10}{'lock-step s':>12}{'async s':>10}{'ratio':>8}{'ceiling':>9}{'G s':>8}"
      f"{'idle lock':>11}{'idle async':>12}{'steady async':>14}\n")
    for kind in ("lognormal", "fixed"):
        f = figures[kind]
        w(f"{kind:<10}{f['lockstep']['wall_s']:>12.2f}{f['async']['wall_s']:>10.2f}{f['ratio']:>8.2f}"
          f"{f.get('ceiling', float('nan')):>9.2f}{f['lockstep']['mean_generate_s']:>8.3f}"
          f"{f['lockstep']['idle_fraction']:>11.1%}{f['async']['idle_fraction']:>12.1%}"
          f"{f['async']['idle_fraction_steady']:>14.1%}\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
