"""Training-path log-probs: the fused VocabLogprob node against chunked checkpointing.

    .venv/bin/python bench/vocab_backward.py [--rows 1024] [--hidden 256] [--vocab 152064] [--reps 3]

Both score `rows` hidden states against a `vocab`-row output layer and back-propagate an
upstream gradient. `checkpoint`: 256-row chunks of logits → fused cross-entropy, each under
torch.utils.checkpoint (recomputed in backward; one output-layer call per chunk, the
previous implementation). `fused`: models.vocab.VocabLogprob (one node; backward by
vocabulary blocks). Interleaved, min of `reps`; prints a table on stderr and one JSON line
with the speed ratio and the largest differences of values and gradients.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from mars_cli.models.vocab import VocabLogprob

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    h0, w0 = torch.randn(a.rows, a.hidden), torch.randn(a.vocab, a.hidden) * 0.02
    t, g = torch.randint(0, a.vocab, (a.rows,)), torch.randn(a.rows)

    def chunk(hs, ts, w):
        return -F.cross_entropy(F.linear(hs, w).float(), ts, reduction="none")

    def checkpointed(h, w):
        return torch.cat([checkpoint(chunk, h[s:s + 256], t[s:s + 256], w, use_reentrant=False)
                          for s in range(0, a.rows, 256)])

    def fused(h, w):
        return VocabLogprob.apply(h, w, None, t)

    times: dict[str, list[float]] = {}
    grads = {}
    for _ in range(a.reps):
        for name, fn in (("checkpoint", checkpointed), ("fused", fused)):
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            t0 = time.perf_counter()
            out = fn(h, w)
            (out * g).sum().backward()
            times.setdefault(name, []).append(time.perf_counter() - t0)
            grads[name] = (out.detach(), h.grad, w.grad)
    best = {k: min(v) for k, v in times.items()}
    diff = [float((x - y).abs().max()) for x, y in zip(grads["checkpoint"], grads["fused"])]
    sys.stderr.write("".join(f"{k:<11} {v:8.3f} s\n" for k, v in best.items()))
    print(json.dumps({"bench": "vocab_backward", "rows": a.rows, "hidden": a.hidden, "vocab": a.vocab,
                      "seconds": {k: round(v, 4) for k, v in best.items()},
                      "speedup_fused": round(best["checkpoint"] / best["fused"], 3),
                      "max_abs_diff": {"logprob": diff[0], "grad_hidden": diff[1], "grad_weight": diff[2]}}))


if __name__ == "__main__":
    main()
