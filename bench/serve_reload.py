"""Benchmark a weight reload in a running `mars serve` against a full restart of the server.

    .venv/bin/python bench/serve_reload.py [--reps 3] [--layers 2] [--vocab 0] [--device cpu]

Builds two sibling tiny checkpoints (`mars tiny-model`, different seeds), then, interleaved
in one run so the ratio is side by side, times the median of:

  restart  a fresh `mars serve --engine hf` process from exec until /health answers 200
           for the other checkpoint (process start, imports, tokenizer, weights): what a
           pipeline that starts its engine anew every RL step pays per step
  reload   POST /load of the other checkpoint into the one server kept running, until
           /health shows its fingerprint at the next weight version and the push probe
           matches the trainer's model (`push_checkpoint`)

and a generation request after each, so both are timed to "serving again". Prints a table
on stderr and one JSON line {restart_s, reload_s, ratio} on stdout. The tiny model keeps
the load itself small, so the ratio is mostly the fixed cost a restart adds; with a 7B
checkpoint both grow by the weights' read time, and vLLM's restart adds its compile and
CUDA-graph capture (minutes), which a reload skips.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def mars(*args) -> list[str]:
    return [sys.executable, "-m", "mars_cli", *map(str, args)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def first_token(url: str) -> None:
    """One short generation: the server is serving again."""
    r = httpx.post(url + "/inference/v1/generate", timeout=120,
                   json={"token_ids": [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198],
                         "sampling_params": {"max_tokens": 2, "temperature": 0, "logprobs": 0}})
    r.raise_for_status()


def start(policy: Path, device: str, port: int = 0):
    p = subprocess.Popen(mars("serve", "--policy", policy, "--port", port, "--device", device, "-q"),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env())
    line = p.stdout.readline()
    if not line:
        p.wait()
        raise SystemExit(f"serve_reload: mars serve exited with {p.returncode}")
    return p, json.loads(line)["url"]


def stop(p) -> None:
    p.terminate()
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2, help="tiny-model --layers")
    ap.add_argument("--vocab", type=int, default=0, help="tiny-model --vocab (0: the full 152k vocabulary)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mars_cli.serve.push import push_checkpoint

    with tempfile.TemporaryDirectory(prefix="mars-bench-reload-") as tmp:
        cks = [Path(tmp) / "ck-a", Path(tmp) / "ck-b"]
        for i, ck in enumerate(cks):
            extra = ["--vocab", a.vocab] if a.vocab else []
            subprocess.run(mars("tiny-model", ck, "--seed", i, "--layers", a.layers, *extra), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
        # The push's proof scores the probe with the trainer's model, in memory as a
        # resident trainer's is (loading it is not the server's cost).
        from mars_cli.models.load import load_policy
        from mars_cli.serve.probe import model_reference

        trainers = {str(ck): model_reference(load_policy(ck, dtype="float32")) for ck in cks}
        restart, reload = [], []
        server, url = start(cks[0], a.device)
        try:
            first_token(url)
            for rep in range(a.reps):
                target = cks[(rep + 1) % 2]
                # restart: a second server from nothing, serving `target`
                t0 = time.perf_counter()
                p2, url2 = start(target, a.device)
                first_token(url2)
                restart.append(time.perf_counter() - t0)
                stop(p2)
                # reload: the running server loads `target` in place
                t0 = time.perf_counter()
                push_checkpoint([url], str(target), reference=trainers[str(target)])
                first_token(url)
                reload.append(time.perf_counter() - t0)
                print(f"rep {rep + 1}: restart {restart[-1]:.2f} s, reload {reload[-1]:.2f} s", file=sys.stderr)
        finally:
            stop(server)
    r, l = statistics.median(restart), statistics.median(reload)
    print(f"{'':10}{'median s':>10}\n{'restart':10}{r:>10.2f}\n{'reload':10}{l:>10.2f}\n"
          f"restart / reload = {r / l:.1f}x", file=sys.stderr)
    print(json.dumps({"bench": "serve_reload", "restart_s": round(r, 3), "reload_s": round(l, 3),
                      "ratio": round(r / l, 2), "reps": a.reps, "layers": a.layers, "vocab": a.vocab or 152064,
                      "device": a.device}))


if __name__ == "__main__":
    main()
