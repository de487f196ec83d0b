"""Policy objectives as pure torch: GSPO (sequence level), GRPO/PPO (token level), k3 KL, NLL.

Every objective has one contract (a registry by name, as in `OBJECTIVES`):

    fn(logp, old, adv, mask, *, ref=None, beta=0.0, eps_low, eps_high, denom) -> LossOut

`logp`, `old`, `ref` and `mask` are [B, T] tensors of per-token log-probabilities (padding
anywhere mask is 0), `adv` is [B] (one advantage per trajectory). The returned loss is a
*sum* over the micro-batch divided by `denom`, the size of the whole mini-batch (trajectories
for sequence-level objectives, mask tokens for token-level ones), so that summing the
micro-batch losses of a mini-batch gives the same value and gradient however the
trajectories were packed into micro-batches. `stats` holds sums (not means) for the same
reason; `reduce_stats` turns accumulated sums into the reported metrics.

`grpo-verl` is the token-level clip exactly as the released training script runs it (the
verl fork's core_algos.compute_policy_loss_vanilla and dp_actor, use_dynamic_bsz=True):
the dual clip (a negative advantage's loss is capped at −A·c, c = clip_ratio_c = 3.0) and
verl's token-mean PER MICRO-BATCH: each micro-batch's loss is the mean over its own mask
tokens, weighted by its share of the mini-batch's trajectories (loss_scale_factor =
micro-batch size / mini-batch size). Its `denom` is therefore per micro-batch
(LEVEL "micro-token": its tokens × mini-batch trajectories / its trajectories), so short
and long trajectories weigh differently than under `grpo`'s one token-mean per mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# GSPO's ranges are tiny because a sequence ratio averages hundreds of token ratios.
GSPO_EPS = (3e-4, 4e-4)
GRPO_EPS = (0.2, 0.28)
DUAL_CLIP_C = 3.0  # verl's clip_ratio_c default (core_algos.py compute_policy_loss_vanilla)


@dataclass
class LossOut:
    loss: torch.Tensor
    stats: dict = field(default_factory=dict)  # name -> float sums, see reduce_stats


def _masked_mean_per_seq(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the mask tokens of each row; 0 for a row without any."""
    n = mask.sum(dim=1)
    return (x * mask).sum(dim=1) / n.clamp(min=1)


K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ‖π_ref): exp(r) − r − 1 with r = log π_ref − log π_θ.

    Never negative; the gradient flows through logp only. As verl's kl_penalty
    ("low_var_kl"/"k3"): r is clamped to ±20 (an exp overflow would make one token
    dominate) and the estimate to ±10, so a token far from the reference adds at most 10
    and, past that, no gradient.
    """
    r = (ref - logp).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.exp(r) - r - 1.0).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)


def _seq_stats(ratio: torch.Tensor, clipped: torch.Tensor, kl_seq: torch.Tensor | None, has_tokens: torch.Tensor) -> dict:
    r = ratio.detach()[has_tokens]
    return {
        "n": float(has_tokens.sum()),
        "clipped": float(clipped.detach()[has_tokens].sum()),
        "ratio_sum": float(r.sum()),
        "ratio_min": float(r.min()) if r.numel() else None,
        "ratio_max": float(r.max()) if r.numel() else None,
        "kl_sum": float(kl_seq.detach()[has_tokens].sum()) if kl_seq is not None else 0.0,
    }


def gspo(logp, old, adv, mask, *, ref=None, beta: float = 0.0, eps_low: float = GSPO_EPS[0],
         eps_high: float = GSPO_EPS[1], denom: float = 1.0) -> LossOut:
    """GSPO: clip the length-normalised sequence ratio s = exp(mean_t(log π_θ − log π_old)).

    The gradient of s is s · mean_t ∇log π_θ(y_t), exactly the paper's (equal to its
    GSPO-token form sg[s]·π_θ(y_t)/sg[π_θ(y_t)] averaged over t when A is per sequence).
    """
    mask = mask.to(logp.dtype)
    has = mask.sum(dim=1) > 0
    log_s = _masked_mean_per_seq(logp - old, mask)
    s = torch.exp(log_s)
    surr = s * adv
    surr_clip = torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_seq = -torch.minimum(surr, surr_clip)
    clipped = surr_clip < surr  # the clipped side was taken: no gradient from this sequence
    kl_seq = None
    if ref is not None and beta:
        kl_seq = _masked_mean_per_seq(k3(logp, ref), mask)
        per_seq = per_seq + beta * kl_seq
    per_seq = torch.where(has, per_seq, torch.zeros_like(per_seq))
    return LossOut(per_seq.sum() / denom, _seq_stats(s, clipped, kl_seq, has))


def grpo(logp, old, adv, mask, *, ref=None, beta: float = 0.0, eps_low: float = GRPO_EPS[0],
         eps_high: float = GRPO_EPS[1], denom: float = 1.0, clip_c: float | None = None) -> LossOut:
    """Token-level PPO/GRPO clip (DAPO's asymmetric range), averaged over all mask tokens.

    With `clip_c` (dual-clip PPO), a token of a negative advantage loses at most −A·clip_c.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp((logp - old).clamp(-20.0, 20.0))
    a = adv.unsqueeze(1)
    surr = ratio * a
    surr_clip = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * a
    per_tok = -torch.minimum(surr, surr_clip)
    if clip_c is not None:
        per_tok = torch.where(a < 0, torch.minimum(per_tok, -a * clip_c), per_tok)
    kl_tok = None
    if ref is not None and beta:
        kl_tok = k3(logp, ref)
        per_tok = per_tok + beta * kl_tok
    on = mask > 0
    r = ratio.detach()[on]
    stats = {
        "n": float(on.sum()),
        "clipped": float((surr_clip < surr).detach()[on].sum()),
        "ratio_sum": float(r.sum()),
        "ratio_min": float(r.min()) if r.numel() else None,
        "ratio_max": float(r.max()) if r.numel() else None,
        "kl_sum": float(kl_tok.detach()[on].sum()) if kl_tok is not None else 0.0,
    }
    return LossOut((per_tok * mask).sum() / denom, stats)


def nll(logp, mask, *, denom: float = 1.0) -> LossOut:
    """Negative log-likelihood of the mask tokens (SFT), summed then divided by `denom`."""
    mask = mask.to(logp.dtype)
    total = -(logp * mask).sum()
    return LossOut(total / denom, {"n": float(mask.sum()), "nll_sum": float(total.detach())})


def grpo_verl(logp, old, adv, mask, *, ref=None, beta: float = 0.0, eps_low: float = GRPO_EPS[0],
              eps_high: float = GRPO_EPS[1], denom: float = 1.0) -> LossOut:
    """`grpo` with verl's dual clip (c = 3.0); its `denom` is per micro-batch (module doc)."""
    return grpo(logp, old, adv, mask, ref=ref, beta=beta, eps_low=eps_low, eps_high=eps_high, denom=denom,
                clip_c=DUAL_CLIP_C)


OBJECTIVES = {"gspo": gspo, "grpo": grpo, "grpo-verl": grpo_verl}
# What `denom` counts for each objective: trajectories or mask tokens of the mini-batch, or
# (micro-token) a micro-batch's mask tokens scaled by mini-batch / micro-batch trajectories.
LEVEL = {"gspo": "sequence", "grpo": "token", "grpo-verl": "micro-token"}
DEFAULT_EPS = {"gspo": GSPO_EPS, "grpo": GRPO_EPS, "grpo-verl": GRPO_EPS}


def loss_denominator(level: str, mini_trajectories: int, mini_tokens: int, micro_trajectories: int,
                     micro_tokens: int) -> float:
    """`denom` for one micro-batch, by the objective's LEVEL (never below 1 token/trajectory)."""
    if level == "sequence":
        return max(mini_trajectories, 1)
    if level == "token":
        return max(mini_tokens, 1)
    # verl: mean over this micro-batch's tokens × (its trajectories / the mini-batch's)
    return max(micro_tokens, 1) * max(mini_trajectories, 1) / max(micro_trajectories, 1)


def merge_stats(acc: dict, new: dict) -> dict:
    """Add one micro-batch's stats sums into `acc` (min/max kept as min/max)."""
    for k, v in new.items():
        if v is None:
            continue
        if k.endswith("_min"):
            acc[k] = v if acc.get(k) is None else min(acc[k], v)
        elif k.endswith("_max"):
            acc[k] = v if acc.get(k) is None else max(acc[k], v)
        else:
            acc[k] = acc.get(k, 0.0) + v
    return acc


def reduce_stats(acc: dict) -> dict:
    """Accumulated sums → clip fraction, mean KL and ratio mean/min/max."""
    n = acc.get("n", 0.0)
    return {
        "clip_fraction": acc.get("clipped", 0.0) / n if n else 0.0,
        "kl": acc.get("kl_sum", 0.0) / n if n else 0.0,
        "ratio_mean": acc.get("ratio_sum", 0.0) / n if n else 1.0,
        "ratio_min": acc.get("ratio_min") if acc.get("ratio_min") is not None else 1.0,
        "ratio_max": acc.get("ratio_max") if acc.get("ratio_max") is not None else 1.0,
    }
