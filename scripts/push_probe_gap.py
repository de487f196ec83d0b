"""Measure the push probe's gap (serve.probe), the figure its bound --push-max-gap rests on.

    PYTHONPATH=. .venv/bin/python scripts/push_probe_gap.py [--engine hf] [--arch qwen2.5-vl]
        [--loads 10] [--models A B] [--dtype float32] [--head-dim 16]
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python scripts/push_probe_gap.py --engine vllm

Serves model A in one `mars serve` (in this process), then loads B, A, B, … --loads times,
and after each load compares the probe the server answered with the trainer's forward
pass (fp32, CPU) of the checkpoint it loaded ("new": a correct push must stay under the
bound) and of the one it served before ("old": what a server that kept the old weights
would show; it must be far over the bound). It then serves the same loads done wrong
(`stale`, the "new" gap of every other load): with hf, loads that keep the previous model's
tied embeddings; with vllm, vLLM's own `reload_weights` without mars's retie of the tied
output head (the fault mars_cli.engines.vllm_worker fixes). A and B default to `mars
tiny-model` seeds 0 and 1 of --arch, with --head-dim 32 on vllm (its CPU attention refuses
16) and sleep mode where the platform has it (vLLM's CPU build has none). Prints one line per load on stderr and one JSON summary on stdout: for each case
the smallest and largest per-load gap (the largest |server − trainer| over the probe).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def backend(engine: str, dtype: str):
    if engine == "hf":
        from mars_cli.serve.hf_backend import HFBackend

        return HFBackend(seed=0, dtype=dtype)
    from mars_cli.serve.vllm_backend import VLLMBackend, sleep_mode_available

    return VLLMBackend(seed=0, dtype=dtype, max_model_len=1024, sleep_mode=sleep_mode_available())


def stale_embeddings(real):
    """HFBackend._load made to keep the embeddings (tied to the output head) it served
    before, the way an in-place reload that mishandles tied embeddings fails; it still
    reports the new fingerprint and weight version (tests/test_push_probe.py uses it too)."""
    import torch

    def load(self, *args, **kw):
        old = self.policy.model.get_input_embeddings().weight.detach().clone() if self.policy else None
        policy = real(self, *args, **kw)
        if old is not None:
            with torch.no_grad():
                policy.model.get_input_embeddings().weight.copy_(old)
        return policy

    return load


def keep_old_embeddings(engine: str) -> None:
    if engine == "hf":
        from mars_cli.serve.hf_backend import HFBackend

        HFBackend._load = stale_embeddings(HFBackend._load)
        return
    from mars_cli.serve.vllm_backend import VLLMBackend

    async def vllms_own_reload(self, path: str) -> None:
        await self._call("POST", "/collective_rpc", timeout=self.load_timeout,
                         json={"method": "reload_weights", "kwargs": {"weights_path": path}, "timeout": self.load_timeout})

    VLLMBackend._reload = vllms_own_reload


def measure(engine: str, dtype: str, models: list[Path], loads: int) -> dict:
    import httpx

    from mars_cli.models.load import load_policy
    from mars_cli.serve import probe as P
    from mars_cli.serve.app import App
    from mars_cli.serve.run import in_thread

    trainers = {str(m): load_policy(m, dtype="float32") for m in models}
    out = {"new": [], "old": []}
    app = App(backend(engine, dtype), allow_load="/", max_images=4, max_image_bytes=1 << 20)  # loopback only
    with in_thread(app, str(models[0])) as url:
        for i in range(loads):
            new, old = models[(i + 1) % 2], models[i % 2]
            r = httpx.post(url + "/load", json={"path": str(new)}, timeout=1800)
            r.raise_for_status()
            probe = r.json()["probe"]
            if probe.get("error"):
                raise SystemExit(f"push_probe_gap: {probe['error']}")
            for case, ck in (("new", new), ("old", old)):
                g = P.gaps(probe, P.reference_logprobs(trainers[str(ck)], [probe])[0])
                out[case].append(g["gap"])
                print(f"load {i + 1} ({Path(new).name}): {case:3} gap {g['gap']:.3g} (mean {g['mean']:.3g}, "
                      f"{g['tokens']} tokens)", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="hf", choices=("hf", "vllm"))
    ap.add_argument("--arch", default="qwen2.5-vl")
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--models", nargs=2, type=Path)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--head-dim", type=int, help="of the default models (16 on hf, 32 on vllm)")
    a = ap.parse_args()
    from mars_cli.models.tiny import make_tiny_model
    from mars_cli.serve import probe as P

    head_dim = None if a.models else a.head_dim or (32 if a.engine == "vllm" else 16)
    with tempfile.TemporaryDirectory(prefix="mars-probe-gap-") as tmp:
        root = Path(tmp)
        if a.models:
            models = [m.resolve() for m in a.models]
        else:
            models = [make_tiny_model(root / f"seed{s}", arch=a.arch, seed=s, head_dim=head_dim) for s in (0, 1)]
        gaps = measure(a.engine, a.dtype, models, a.loads)
        keep_old_embeddings(a.engine)
        gaps["stale"] = measure(a.engine, a.dtype, models, a.loads)["new"][::2]  # every other load keeps other's
    summary = {k: {"min": min(v), "max": max(v), "loads": len(v)} for k, v in gaps.items()}
    print(json.dumps({"engine": a.engine, "arch": a.arch, "dtype": a.dtype, "head_dim": head_dim, "probe_tokens": P.NEW_TOKENS,
                      "bound": P.MAX_GAP, **summary}))


if __name__ == "__main__":
    main()
