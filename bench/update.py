"""Benchmark `mars update` against a plain forward+backward of the same batch.

    .venv/bin/python bench/update.py [--policy DIR] [--n 8] [--reps 3] [--zero 0 2]
    .venv/bin/python bench/update.py --image-size 3840x2160 --micro-batch-tokens 1024 --prefetch both --zero 0

Builds (or takes) a policy, writes a batch of N one-image trajectories with the default
system prompt and a ~200-token answer, then runs, each in its own fresh process so peak
memory is per method, interleaved rep by rep so the ratios are side by side:

  plain       load, then per micro-batch: forward → GSPO loss → backward (no DeepSpeed,
              no optimizer step): the floor any trainer pays
  plain+adam  the same plus a torch AdamW step (the optimizer's own cost)
  update zN   mars update's training loop (run_update, ZeRO stage N): input rebuild,
              forward/backward, DeepSpeed accumulation, clipping, AdamW step; its
              `train_seconds` (model load and checkpoint write are reported apart)

With `--prefetch both`, each `update` method also runs with MARS_PREFETCH=0 (every
micro-batch's images decoded and resized inline, no background build of the next one).

Figures: tokens/s (expanded tokens through forward+backward per second of training),
the overhead ratio update/plain, peak RSS, and CUDA max allocated on a GPU. Wall and CPU
medians are both given: on a shared machine wall time swings, CPU time much less.
Prints a table on stderr and one JSON line of figures on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_batch(policy_dir: str, out: Path, n: int, size: tuple[int, int] | None = None) -> Path:
    from PIL import Image

    from mars_cli import protocol
    from mars_cli.jsonl import write_records
    from mars_cli.models.load import load_tokenizer, special_ids

    tok = load_tokenizer(policy_dir)
    renderer = protocol.Renderer(tok, special_ids(tok))
    recs = []
    for i in range(n):
        if size is None:
            img = out.parent / f"img{i}.png"
            Image.new("RGB", (448 + 28 * i, 448), (30 * i % 255, 120, 200)).save(img)
        else:  # a photo-like JPEG (noise upscaled), a different one per trajectory
            import numpy as np

            img = out.parent / f"img{i}.jpg"
            rng = np.random.default_rng(i)
            small = Image.fromarray(rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8))
            small.resize(size, Image.Resampling.BILINEAR).save(img, quality=90)
        task = {"id": f"t{i}", "question": f"What is written on the sign in picture {i}?", "images": [str(img)]}
        msgs = protocol.initial_messages(task)
        thinking = " ".join(f"Step {k}: the sign shows letters that I read one by one." for k in range(12))
        msgs.append({"role": "assistant", "content": protocol.format_assistant(thinking, answer=f"sign {i}")})
        ids, mask, images = renderer.render(msgs, add_generation_prompt=False)
        recs.append({"id": f"t{i}", "question": task["question"], "group": f"t{i}", "sample": 0, "messages": msgs,
                     "prediction": None, "finish": "answer", "rewards": {}, "reward": 0.0,
                     "advantage": 1.0 if i % 2 else -1.0,
                     "tokens": {"ids": ids, "mask": mask, "logprobs": [0.0] * len(ids), "images": images}})
    write_records(recs, out)
    return out


def _peak(figures: dict) -> dict:
    import torch

    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        figures["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def worker_plain(policy_dir: str, batch: str, budget: int, adam: bool) -> dict:
    import torch

    from mars_cli.jsonl import read_located
    from mars_cli.rl import batching, loss as L
    from mars_cli.rl.update import prepare_policy

    pol, _ = prepare_policy(policy_dir, train_vision=False, gradient_checkpointing=False, bf16=None, seed=0)
    exs = batching.update_examples(read_located([batch]), pol.special["image_pad"])
    lengths = [batching.expanded_length(pol, e) for e in exs]
    groups = batching.pack(range(len(exs)), lengths.__getitem__, budget)
    opt = torch.optim.AdamW([p for p in pol.model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.01)
    w0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    for g in groups:
        part = [exs[i] for i in g]
        lp, mask, ntok = batching.micro_logprobs(pol, part, grad=True)
        adv = torch.tensor([e.advantage for e in part], device=lp.device)
        L.gspo(lp.float(), lp.detach().float(), adv, mask, denom=len(exs)).loss.backward()
        tokens += ntok
    if adam:
        torch.nn.utils.clip_grad_norm_(pol.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return _peak({"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0, "tokens": tokens})


def worker_update(policy_dir: str, batch: str, budget: int, zero: int) -> dict:
    from mars_cli.rl.update import UpdateConfig, run_update

    out = Path(tempfile.mkdtemp(prefix="bench-update-"))
    c0 = time.process_time()
    m = run_update([batch], UpdateConfig(policy=policy_dir, out=str(out / "ckpt"), zero=zero, beta=0.0,
                                         micro_batch_tokens=budget))
    cpu = time.process_time() - c0
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return _peak({"wall": m["train_seconds"], "cpu": m["train_cpu_seconds"], "cpu_total": cpu, "total_seconds": m["seconds"], "tokens": m["tokens"]})


def run_worker(args: list[str], prefetch: str | None = None) -> dict:
    env = {**os.environ, **({"MARS_PREFETCH": prefetch} if prefetch is not None else {})}
    p = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"worker {args[0]} failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", help="policy directory [default: a tiny Qwen2.5-VL made here]")
    ap.add_argument("--n", type=int, default=8, help="trajectories in the batch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--image-size", help="WxH of each trajectory's image (a JPEG photo) [default: ~448x448 PNG]")
    ap.add_argument("--prefetch", choices=["on", "off", "both"], default="on",
                    help="update methods with the background input build, without it, or both")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, policy, batch, budget, extra = a.worker[0], a.worker[1], a.worker[2], int(a.worker[3]), a.worker[4]
        fig = (worker_plain(policy, batch, budget, extra == "adam") if kind == "plain"
               else worker_update(policy, batch, budget, int(extra)))
        print(json.dumps(fig))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-update-"))
    policy = a.policy
    if policy is None:
        from mars_cli.models.tiny import make_tiny_model

        policy = str(make_tiny_model(tmp / "tiny"))
    size = tuple(int(x) for x in a.image_size.lower().split("x")) if a.image_size else None
    batch = str(make_batch(policy, tmp / "batch.jsonl", a.n, size))
    methods = {"plain": ["plain", "fwdbwd", None], "plain+adam": ["plain", "adam", None]}
    for z in a.zero:
        if a.prefetch in ("on", "both"):
            methods[f"update z{z}"] = ["update", str(z), "1"]
        if a.prefetch in ("off", "both"):
            methods[f"update z{z} inline"] = ["update", str(z), "0"]
    runs: dict[str, list[dict]] = {k: [] for k in methods}
    for _ in range(a.reps):
        for name, (kind, extra, pf) in methods.items():
            runs[name].append(run_worker([kind, policy, batch, str(a.micro_batch_tokens), extra], prefetch=pf))
    out = {"policy": "tiny-qwen2.5-vl" if a.policy is None else a.policy, "n": a.n, "reps": a.reps,
           "device": "cuda" if _cuda() else "cpu", "tokens": runs["plain"][0]["tokens"]}
    base = statistics.median(r["wall"] for r in runs["plain"])
    base_cpu = statistics.median(r["cpu"] for r in runs["plain"])
    sys.stderr.write(f"{'method':<18} {'wall s':>8} {'tok/s':>9} {'ratio':>6} {'cpu s':>8} {'cpu ratio':>9} {'peak RSS MB':>12}\n")
    for name, rs in runs.items():
        wall = statistics.median(r["wall"] for r in rs)
        key = name.replace(" ", "_").replace("+", "_")
        out[f"{key}_wall_s"] = round(wall, 4)
        out[f"{key}_tokens_per_s"] = round(rs[0]["tokens"] / wall, 1)
        out[f"{key}_overhead_ratio"] = round(wall / base, 3)
        out[f"{key}_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in rs), 1)
        cpu = statistics.median(r["cpu"] for r in rs)
        out[f"{key}_cpu_s"] = round(cpu, 4)
        out[f"{key}_cpu_overhead_ratio"] = round(cpu / base_cpu, 3)
        if "cuda_max_allocated_mb" in rs[0]:
            out[f"{key}_cuda_max_allocated_mb"] = round(max(r["cuda_max_allocated_mb"] for r in rs), 1)
        sys.stderr.write(f"{name:<18} {wall:>8.3f} {rs[0]['tokens'] / wall:>9.1f} {wall / base:>6.2f} "
                         f"{cpu:>8.3f} {cpu / base_cpu:>9.2f} {out[f'{key}_peak_rss_mb']:>12.1f}\n")
    print(json.dumps(out))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    os.environ.setdefault("MARS_PROGRESS", "0")
    main()
