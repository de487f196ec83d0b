"""Throughput of `mars advantage` and `mars judge`, against the ideal in the same run.

    .venv/bin/python bench/stages.py                  # 100k records × 2k tokens (≈6 GB temp file)
    .venv/bin/python bench/stages.py --n 20000        # smaller, on a slow machine

1. Generates N judged trajectory records (groups of --group-size) carrying --tokens long
   ids/mask/logprobs arrays into a temporary folder, once.
2. Times, as subprocesses reading that file and writing to /dev/null: a bare orjson
   read-write passthrough (the floor: parse and serialize every record), `mars advantage`
   (in chunks of --adv-batch-size groups, a training step's scope; 0 = the whole input,
   which keeps every record in memory) and `mars judge --scorer em`, after one warm-up
   read so no run pays the disk. Target ≤ 1.5×; CPU seconds are reported beside wall
   seconds since they barely move when other work shares the machine.
3. Starts an OpenAI-compatible stub on 127.0.0.1 answering after --latency seconds and
   times `mars judge --scorer llm` on --llm-n records with --max-inflight, against the
   ideal N × latency / concurrency. Target ≤ 1.2×.

Prints one JSON line of figures on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import orjson

PASSTHROUGH = (
    "import sys, orjson\n"
    "out = sys.stdout.buffer\n"
    "for line in sys.stdin.buffer:\n"
    "    out.write(orjson.dumps(orjson.loads(line), option=orjson.OPT_APPEND_NEWLINE))\n"
)


def generate(path: Path, n: int, tokens: int, group_size: int, seed: int = 0, *, all_wrong: bool = False) -> None:
    """N judged trajectories; with all_wrong no prediction equals its gold (every one needs the LLM)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb", buffering=1 << 20) as f:
        for i in range(n):
            g = i // group_size
            acc = 0.0 if all_wrong else float(rng.integers(0, 2))
            mask = np.zeros(tokens, dtype=np.int64)
            mask[tokens // 4:] = 1
            logprobs = np.where(mask == 1, -rng.exponential(0.5, tokens), 0.0)
            rec = {
                "schema_version": 1, "id": f"task-{g}", "question": f"What is shown in picture {g}?",
                "images": [f"images/{g}.jpg"], "answers": [f"answer {g % 97}"], "choices": None,
                "benchmark": "bench", "scorer": "llm", "meta": {}, "group": f"task-{g}", "sample": i % group_size,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                             {"role": "assistant", "content": "<answer>x</answer>"}],
                "tool_calls": [{"turn": 0, "name": "text_search_tool", "arguments": {"query": "q"}, "ok": True,
                                "error": None, "latency": 0.2}],
                "prediction": f"answer {g % 97}" if acc else f"the answer is {i % 13}",
                "finish": "answer",
                "tokens": {"ids": rng.integers(0, 151000, tokens), "mask": mask, "logprobs": logprobs},
                "rewards": {"accuracy": acc, "format": 1.0}, "reward": acc + 0.5,
            }
            f.write(orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))


def write_images(folder: Path, groups: int) -> None:
    """The small distinct images the LLM-judged records name (images/G.jpg): the judge sends each."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for g in range(groups):
        Image.new("RGB", (64, 48), (g % 256, (g * 7) % 256, 128)).save(folder / f"{g}.jpg")


def timed(cmd: list[str], src: Path, env: dict | None = None, cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+system) of one subprocess run.

    CPU time is reported beside wall time because it hardly moves when other work
    shares the machine; wall time is what a user waits.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(src, "rb") as fin, open(os.devnull, "wb") as fout:
        p = subprocess.run(cmd, stdin=fin, stdout=fout, stderr=subprocess.PIPE, env=env, cwd=cwd)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def warm(path: Path) -> None:
    """Read the file once so every timed run finds it in the page cache (none pays the disk)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


class SlowJudge:
    """A /v1/chat/completions stub that answers every request after `latency` seconds."""

    def __init__(self, latency: float):
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "<verdict>no</verdict>"}}]}).encode()
        self.calls = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server would
            disable_nagle_algorithm = True  # headers and body are two writes

            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(latency)
                with lock:
                    outer.calls += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="records for the throughput runs")
    ap.add_argument("--tokens", type=int, default=2000, help="length of each record's token arrays")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--adv-batch-size", type=int, default=64, help="groups per advantage chunk (0: whole input)")
    ap.add_argument("--llm-n", type=int, default=2000, help="records for the LLM judge run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repeats of the throughput runs (best counts)")
    ap.add_argument("--dir", default=None, help="folder for the generated files [default: a temporary one]")
    args = ap.parse_args()

    mars = [sys.executable, "-m", "mars_cli"]
    env = {**os.environ, "MARS_PROGRESS": "0"}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        big, small = Path(tmp) / "big.jsonl", Path(tmp) / "small.jsonl"
        t = time.perf_counter()
        generate(big, args.n, args.tokens, args.group_size)
        gen_s = time.perf_counter() - t
        size_gb = big.stat().st_size / 1e9
        print(f"generated {args.n} records ({size_gb:.2f} GB) in {gen_s:.1f}s", file=sys.stderr)
        generate(small, args.llm_n, 16, args.group_size, seed=1, all_wrong=True)
        # records read from stdin resolve relative image paths against the working directory
        write_images(Path(tmp) / "images", -(-args.llm_n // args.group_size))

        adv = mars + ["advantage"] + (["--batch-groups", str(args.adv_batch_size)] if args.adv_batch_size else [])
        warm(big)
        startup, _ = timed(mars + ["judge"], Path(os.devnull), env)
        # Interleaved repeats; the best of each is the least disturbed by other load.
        runs = {"base": [], "adv": [], "em": []}
        for _ in range(args.repeat):
            runs["base"].append(timed([sys.executable, "-c", PASSTHROUGH], big))
            runs["adv"].append(timed(adv, big, env))
            runs["em"].append(timed(mars + ["judge", "--scorer", "em"], big, env))
        (base, base_cpu), (adv_s, adv_cpu), (em_s, em_cpu) = (
            (min(w for w, _ in runs[k]), min(c for _, c in runs[k])) for k in ("base", "adv", "em"))

        stub = SlowJudge(args.latency)
        llm_env = {**env, "MARS_JUDGE_API_KEY": "bench"}
        llm_cmd = mars + ["judge", "--scorer", "llm", "--judge-base-url", stub.url, "--judge-model", "stub",
                          "--max-inflight", str(args.concurrency)]
        llm_s, llm_cpu = timed(llm_cmd, small, llm_env, cwd=Path(tmp))
        ideal = args.llm_n * args.latency / args.concurrency
        stub.server.shutdown()

    fig = {
        "n": args.n, "tokens": args.tokens, "file_gb": round(size_gb, 3),
        "passthrough_s": round(base, 2), "advantage_s": round(adv_s, 2), "judge_em_s": round(em_s, 2),
        "advantage_ratio": round(adv_s / base, 3), "judge_em_ratio": round(em_s / base, 3),
        "passthrough_cpu_s": round(base_cpu, 2), "advantage_cpu_s": round(adv_cpu, 2), "judge_em_cpu_s": round(em_cpu, 2),
        "advantage_cpu_ratio": round(adv_cpu / base_cpu, 3), "judge_em_cpu_ratio": round(em_cpu / base_cpu, 3),
        "advantage_rec_per_s": round(args.n / adv_s), "judge_em_rec_per_s": round(args.n / em_s),
        "adv_batch_size": args.adv_batch_size,
        "llm_n": args.llm_n, "llm_concurrency": args.concurrency, "llm_latency_s": args.latency,
        "llm_calls": stub.calls, "llm_wall_s": round(llm_s, 2), "llm_ideal_s": round(ideal, 2),
        "llm_ratio": round(llm_s / ideal, 3), "llm_cpu_s": round(llm_cpu, 2),
        "mars_startup_s": round(startup, 2), "llm_ratio_excl_startup": round((llm_s - startup) / ideal, 3), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    rows = [("orjson passthrough", base, 1.0, base_cpu, 1.0), ("mars advantage", adv_s, adv_s / base, adv_cpu, adv_cpu / base_cpu),
            ("mars judge --scorer em", em_s, em_s / base, em_cpu, em_cpu / base_cpu),
            ("mars judge --scorer llm", llm_s, llm_s / ideal, llm_cpu, float("nan"))]
    print(f"{'stage':<26}{'wall s':>9}{'ratio':>8}{'cpu s':>9}{'ratio':>8}", file=sys.stderr)
    for name, w, r, c, cr in rows:
        print(f"{name:<26}{w:>9.2f}{r:>8.2f}{c:>9.2f}{cr:>8.2f}", file=sys.stderr)
    print(f"(llm ratio is against the ideal {ideal:.2f}s = {args.llm_n} × {args.latency}s / {args.concurrency}; "
          f"mars starts in {startup:.2f}s)", file=sys.stderr)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
