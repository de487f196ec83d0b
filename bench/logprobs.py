"""Benchmark per-token log-probs: chunked cross-entropy against a full log-softmax.

    .venv/bin/python bench/logprobs.py [--reps 5] [--batch 2] [--length 1024] [--device cpu]

Builds a tiny Qwen2.5-VL checkpoint (real 152k vocabulary, 64-wide: the vocabulary
projection dominates, as it does for log-prob passes of a 7B model over long episodes),
then, interleaved in one run so the ratios are side by side, times the median of:

  full        model(**inputs).logits → log_softmax over the vocabulary → gather (the
              textbook way: two (batch × length × vocab) float tensors)
  ours        models.logprobs.token_logprobs: backbone hidden states, vocabulary projection
              in 256-row chunks, a fused cross-entropy per chunk (no full-vocab copy)
  ours_masked token_logprobs with the policy mask (a quarter of the tokens scored, as
              for the assistant turns of an episode)

and, each in a fresh process, the peak resident memory of one pass above the memory of
loading the model and building the inputs. Also the largest difference between `full`
and `ours` (they must agree to float32 rounding). Prints a table on stderr and one JSON
line of figures on stdout.
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


def _setup(model_dir: str, batch: int, length: int, device: str):
    import torch
    from PIL import Image

    from mars_cli.models.inputs import build_inputs
    from mars_cli.models.load import load_policy

    policy = load_policy(model_dir, device=device, dtype="float32")
    g = torch.Generator().manual_seed(0)
    sp = policy.special
    seqs, masks = [], []
    for b in range(batch):
        img = Image.effect_noise((448 + 56 * b, 336), 60).convert("RGB")
        head = [sp["im_start"], 872, 198, sp["vision_start"], sp["image_pad"], sp["vision_end"]]
        body = torch.randint(0, 150000, (length - len(head),), generator=g).tolist()
        ids = head + body
        seqs.append((ids, [img]))
        masks.append([0] * (len(ids) - len(ids) // 4) + [1] * (len(ids) // 4))
    batch_in = build_inputs(policy, seqs, device=policy.device)
    return policy, seqs, masks, batch_in


def _full(policy, seqs, batch_in):
    import torch

    with torch.no_grad():
        logits = policy.model(**batch_in.tensors, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for b, (ids, _) in enumerate(seqs):
            pos = batch_in.positions[b].to(logp.device)
            ids_t = torch.tensor(ids, device=logp.device)
            vals = logp[b, pos[1:] - 1].gather(-1, ids_t[1:, None]).squeeze(-1)
            out.append(torch.cat([torch.zeros(1, device=logp.device), vals]))
    return out


def _ours(policy, seqs, batch_in, masks=None):
    from mars_cli.models.logprobs import token_logprobs

    return token_logprobs(policy, seqs, batch=batch_in, masks=masks)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(model_dir: str, variant: str, batch: int, length: int, device: str) -> None:
    """Run in a fresh process: print the peak-RSS (or CUDA peak) increase of one pass, MiB."""
    import torch

    policy, seqs, masks, batch_in = _setup(model_dir, batch, length, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Reset the kernel's peak-RSS mark (VmHWM) so loading the model does not count.
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS") * 1024
    {"full": lambda: _full(policy, seqs, batch_in), "ours": lambda: _ours(policy, seqs, batch_in),
     "ours_masked": lambda: _ours(policy, seqs, batch_in, masks)}[variant]()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _status_kib("VmHWM") * 1024
    print(json.dumps({"peak_mib": round((peak - base) / 2**20, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="an existing checkpoint instead of a fresh tiny one")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        _peak_child(args.model, args._child, args.batch, args.length, args.device)
        return

    import torch

    from mars_cli.models.tiny import make_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="mars-bench-")
    model_dir = args.model or str(make_tiny_model(Path(tmp.name) / "tiny", arch="qwen2.5-vl"))
    policy, seqs, masks, batch_in = _setup(model_dir, args.batch, args.length, args.device)
    variants = {"full": lambda: _full(policy, seqs, batch_in), "ours": lambda: _ours(policy, seqs, batch_in),
                "ours_masked": lambda: _ours(policy, seqs, batch_in, masks)}
    ref, got = variants["full"](), variants["ours"]()
    max_diff = max((a - b).abs().max().item() for a, b in zip(ref, got))
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():  # interleaved: load swings hit all variants alike
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(args.device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    peaks = {}
    for name in variants:
        cmd = [sys.executable, __file__, "--_child", name, "--model", model_dir, "--batch", str(args.batch),
               "--length", str(args.length), "--device", args.device]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MARS_PROGRESS="0"))
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        peaks[name] = json.loads(lines[-1])["peak_mib"] if res.returncode == 0 and lines else None
    med = {k: statistics.median(v) for k, v in wall.items()}
    medc = {k: statistics.median(v) for k, v in cpu.items()}
    figures = {
        "bench": "logprobs", "device": args.device, "batch": args.batch, "length": args.length,
        "vocab": int(policy.model.config.text_config.vocab_size), "threads": torch.get_num_threads(),
        "wall_s": {k: round(v, 4) for k, v in med.items()}, "cpu_s": {k: round(v, 4) for k, v in medc.items()},
        "peak_mib": peaks, "speedup_ours": round(med["full"] / med["ours"], 2),
        "speedup_masked": round(med["full"] / med["ours_masked"], 2),
        "memory_ratio_full_over_ours": round(peaks["full"] / peaks["ours"], 1)
        if peaks.get("full") and peaks.get("ours") else None,
        "max_abs_diff": max_diff,
    }
    print(f"{'variant':<12} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}", file=sys.stderr)
    for k in variants:
        print(f"{k:<12} {med[k]:8.3f} {medc[k]:8.3f} {peaks[k] if peaks[k] is not None else '-':>9}", file=sys.stderr)
    print(f"max |full − ours| = {max_diff:.2e}", file=sys.stderr)
    print(json.dumps(figures))
    tmp.cleanup()


if __name__ == "__main__":
    main()
