"""One policy update on a scored batch: GSPO (or token-level GRPO) + k3 KL, through DeepSpeed.

    run_update(["batch.jsonl"], UpdateConfig(policy="ckpt/", out="ckpt-next/")) -> metrics

Each trajectory's model input is rebuilt from its stored token ids and images (placeholders
expanded by models.inputs), and only its mask-1 tokens are trained on. Old log-probs are
recomputed with the policy before any optimizer step (default) or taken from the rollout;
either way the rollout-vs-trainer gap is measured against the pre-step policy. The batch
is split into mini-batches (one optimizer step each), sharded over ranks, and packed into
token-budget micro-batches whose losses are normalised by the whole mini-batch, so packing
and world size do not change the step. Nothing is written unless every step was finite.

The work is split so that a resident trainer (`update --follow`, rl/follow.py) pays the
loading once: `load_session` loads the policy, the reference model and the optimizer;
`train_step` trains one batch of examples; `write_checkpoint` saves the weights.
`run_update` is the three in a row, for one batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

from mars_cli import streams
from mars_cli.errors import MarsError, UsageError
from mars_cli.rl import batching, loss as L
from mars_cli.rl.checkpoint import read_meta, save_checkpoint


@dataclass
class UpdateConfig:
    FLAG_NAMES: ClassVar[dict] = {"mini_batch": "--batch-size"}  # config_argv: the flag's current name

    policy: str
    out: str
    ref: str | None = None
    state: str | None = None
    loss: str = "gspo"
    eps_low: float | None = None  # None: the objective's default (GSPO 3e-4, GRPO 0.2)
    eps_high: float | None = None
    beta: float = 1e-4
    lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mini_batch: int | None = None
    micro_batch_tokens: int | None = None  # None: 4096 on a GPU, 1024 on a CPU
    old_logprobs: str = "recompute"
    zero: int = 0
    deepspeed: str | None = None
    train_vision: bool = False
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: on when training on a GPU
    seed: int = 0
    attn_implementation: str | None = None  # None: transformers' default (sdpa)
    min_pixels: int | None = None  # image pixel limits for records without policy.pixels
    max_pixels: int | None = None


def _device() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def token_budget(requested: int | None, policy) -> int:
    """Padded tokens per micro-batch: as asked, else small on a CPU (151k-wide logits rows)."""
    if requested:
        return requested
    return 4096 if policy.device.type == "cuda" else 1024


def prepare_policy(path: str, *, train_vision: bool, gradient_checkpointing: bool, bf16: bool | None, seed: int,
                   attn_implementation: str | None = None, min_pixels: int | None = None,
                   max_pixels: int | None = None):
    """Load a policy for training: device, dtype, frozen vision, checkpointing."""
    import torch

    from mars_cli.models.load import load_policy
    from mars_cli.rl.engine import freeze_vision, setup_distributed

    setup_distributed()
    torch.manual_seed(seed)
    device = _device()
    use_bf16 = device.startswith("cuda") if bf16 is None else bf16
    policy = load_policy(path, device=device, dtype="bfloat16" if use_bf16 else "float32", trainable=True,
                         attn_implementation=attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels)
    freeze_vision(policy.model, train_vision)
    if gradient_checkpointing:
        policy.model.config.use_cache = False
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, use_bf16


def batch_hash(examples) -> str:
    """Content id of what was trained on (ids, mask, images, advantages)."""
    import orjson

    from mars_cli.fsutil import sha256_bytes

    return sha256_bytes(orjson.dumps([[e.ids, e.mask, e.images, e.advantage] for e in examples]))[:16]


def check_out(out: str, policy: str) -> None:
    """--out must not be the policy it starts from (refused before any work is done)."""
    from pathlib import Path

    if Path(out).resolve() == Path(policy).resolve():
        raise UsageError(f"{out}: --out must differ from --policy")


def _check_flags(cfg: UpdateConfig) -> None:
    check_out(cfg.out, cfg.policy)
    if cfg.loss not in L.OBJECTIVES:
        raise UsageError(f"--loss must be one of {', '.join(L.OBJECTIVES)}, got {cfg.loss!r}")
    if cfg.old_logprobs not in ("recompute", "rollout"):
        raise UsageError(f"--old-logprobs must be recompute or rollout, got {cfg.old_logprobs!r}")
    if cfg.micro_batch_tokens is not None and cfg.micro_batch_tokens < 1:
        raise UsageError("--micro-batch-tokens must be positive")
    for flag, value in (("--lr", cfg.lr), ("--beta", cfg.beta), ("--weight-decay", cfg.weight_decay),
                        ("--grad-clip", cfg.grad_clip), ("--eps-low", cfg.eps_low), ("--eps-high", cfg.eps_high)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    if cfg.lr < 0:
        raise UsageError("--lr must be non-negative")
    if cfg.beta < 0:
        raise UsageError("--beta must be non-negative")


def _gap(acc: dict, trainer_lp, rollout_lp, mask) -> None:
    """Accumulate |log π_trainer − log π_rollout| over mask tokens."""
    if rollout_lp is None:
        return
    d = (trainer_lp.detach() - rollout_lp).abs()[mask > 0]
    if d.numel():
        acc["gap_sum"] = acc.get("gap_sum", 0.0) + float(d.sum())
        acc["gap_n"] = acc.get("gap_n", 0.0) + float(d.numel())
        acc["gap_max"] = max(acc.get("gap_max", 0.0), float(d.max()))


@dataclass
class Session:
    """What a trainer keeps between steps: the policy, the reference model, the optimizer."""

    cfg: UpdateConfig
    policy: object
    bf16: bool
    ref: object
    trainer: object
    budget: int
    eps_low: float
    eps_high: float
    length_cache: dict

    @property
    def vocab_size(self) -> int:
        return int(self.policy.model.get_input_embeddings().num_embeddings)


def load_session(cfg: UpdateConfig, *, policy_path: str | None = None) -> Session:
    """Load the policy (from `policy_path`, default cfg.policy), the reference and the optimizer once."""
    from mars_cli.rl.engine import Trainer

    _check_flags(cfg)
    eps_low, eps_high = (cfg.eps_low if cfg.eps_low is not None else L.DEFAULT_EPS[cfg.loss][0],
                         cfg.eps_high if cfg.eps_high is not None else L.DEFAULT_EPS[cfg.loss][1])
    policy, bf16 = prepare_policy(policy_path or cfg.policy, train_vision=cfg.train_vision,
                                  gradient_checkpointing=cfg.gradient_checkpointing, bf16=cfg.bf16, seed=cfg.seed,
                                  attn_implementation=cfg.attn_implementation, min_pixels=cfg.min_pixels,
                                  max_pixels=cfg.max_pixels)
    ref = None
    if cfg.ref and cfg.beta > 0:
        from mars_cli.models.load import load_policy

        ref = load_policy(cfg.ref, device=str(policy.device), dtype=next(policy.model.parameters()).dtype,
                          attn_implementation=cfg.attn_implementation, min_pixels=cfg.min_pixels,
                          max_pixels=cfg.max_pixels)
    trainer = Trainer(policy.model, zero=cfg.zero, config_file=cfg.deepspeed, lr=cfg.lr,
                      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, bf16=bf16)
    return Session(cfg, policy, bf16, ref, trainer, token_budget(cfg.micro_batch_tokens, policy), eps_low, eps_high, {})


def read_examples(located, session: Session, sampled_by=None) -> list:
    """Scored records → training examples, refused with file:line where they cannot be trained.

    The batch may come from an older policy (a server that had not loaded the last step
    yet, `--follow` staleness): `sampled_by` (rl.sampled_by.SampledBy) counts it, never refused.
    """
    cfg = session.cfg
    if sampled_by is not None:
        located = sampled_by.tally(located)
    examples = batching.update_examples(located, session.policy.special["image_pad"], vocab_size=session.vocab_size)
    if cfg.old_logprobs == "rollout":
        for ex in examples:
            if ex.rollout_logprobs is None:
                raise ex.where.error("tokens.logprobs is missing: use --old-logprobs recompute")
    return examples


def train_step(session: Session, examples, *, trainer_hook=None) -> dict:
    """Train one batch (one optimizer step per mini-batch); return its metrics (all ranks)."""
    import torch

    cfg, policy, trainer, ref = session.cfg, session.policy, session.trainer, session.ref
    eps_low, eps_high = session.eps_low, session.eps_high
    dev = policy.device
    budget = session.budget
    rank, world = trainer.rank, trainer.world
    if rank == 0 and all(ex.advantage == 0 for ex in examples):  # a degenerate batch: say so, still write
        streams.warn(f"all {len(examples)} advantages are 0 (every group's rewards were equal): the policy-gradient "
                     "term is zero and this step applies only the KL term and weight decay; the checkpoint is still written")
    length_cache = session.length_cache
    lengths = [batching.expanded_length(policy, ex, length_cache) for ex in examples]
    minis = batching.minibatches(len(examples), cfg.mini_batch)
    level = L.LEVEL[cfg.loss]

    has_images = [bool(ex.images) for ex in examples] if trainer.stage == 3 else None

    def plan(indices):
        return batching.rank_plan(indices, lengths, budget, rank, world, has_images)

    t_train, c_train = time.time(), time.process_time()
    # Old log-probs and the gap, from the policy before any step.
    old: dict[int, torch.Tensor] = {}
    gap: dict = {}
    several = len(minis) > 1
    if several:
        for mb in minis:
            groups = plan(mb)
            for j, (group, w) in enumerate(groups):
                exs = [examples[i] for i in group]
                with torch.no_grad():  # filler groups too: ZeRO-3 forwards are collective
                    lp, mask, _ = batching.micro_logprobs(policy, exs, model=trainer.model,
                                                          upcoming=batching.upcoming(examples, groups, j))
                for row, i in enumerate(group):  # a filler group's too: its rank trains on it (weight 0)
                    n = len(examples[i].ids)
                    old[i] = lp[row, :n].float()
                    if w and examples[i].rollout_logprobs is not None:
                        _gap(gap, old[i], torch.tensor(examples[i].rollout_logprobs, device=dev), mask[row, :n])
    if cfg.old_logprobs == "rollout":
        old = {i: torch.tensor(ex.rollout_logprobs, dtype=torch.float32, device=dev) for i, ex in enumerate(examples)}

    objective = L.OBJECTIVES[cfg.loss]
    stats: dict = {}
    losses, norms, tokens = [], [], 0
    bar = streams.progress(total=len(minis), desc="update", unit="steps", disable=rank != 0)
    for mb in minis:
        mini_tokens = sum(examples[i].policy_tokens for i in mb)
        groups = plan(mb)
        step_loss = 0.0
        for j, (group, weight) in enumerate(groups):
            exs = [examples[i] for i in group]
            lp, mask, ntok = batching.micro_logprobs(policy, exs, model=trainer.model, grad=True,
                                                     upcoming=batching.upcoming(examples, groups, j))
            lp = lp.float()
            if not several:
                rollout = [examples[i].rollout_logprobs for i in group]
                for row, i in enumerate(group):
                    if rollout[row] is not None and weight:
                        n = len(examples[i].ids)
                        _gap(gap, lp[row, :n], torch.tensor(rollout[row], device=dev), mask[row, :n])
            if cfg.old_logprobs == "recompute" and not several:
                old_t = lp.detach()
            else:
                old_t = batching.pad_rows([old[i] for i in group]).to(dev)
            ref_t = None
            if ref is not None:
                with torch.no_grad():
                    ref_t = batching.micro_logprobs(ref, exs)[0].float().to(dev)
            adv = torch.tensor([ex.advantage for ex in exs], dtype=torch.float32, device=dev)
            denom = L.loss_denominator(level, len(mb), mini_tokens, len(group),
                                       sum(examples[i].policy_tokens for i in group))
            out = objective(lp, old_t, adv, mask, ref=ref_t, beta=cfg.beta, eps_low=eps_low,
                            eps_high=eps_high, denom=denom)
            value = float(out.loss.detach())
            if weight and not math.isfinite(value):
                raise MarsError(f"non-finite loss ({value}) in mini-batch {minis.index(mb) + 1}: nothing written")
            # DeepSpeed averages gradients over ranks; the loss is already a share of the
            # global mini-batch, so undo the average.
            trainer.backward(out.loss * (weight * world), last=j == len(groups) - 1)
            if weight:
                step_loss += value
                tokens += ntok
                L.merge_stats(stats, out.stats)
        if trainer_hook is not None:
            trainer_hook(trainer, mb)
        norms.append(trainer.step())
        losses.append(step_loss)
        bar.update(1)
    bar.close()

    train_seconds, train_cpu = time.time() - t_train, time.process_time() - c_train
    # Every rank sends the same keys (a rank may have seen no policy tokens at all).
    inf = float("inf")
    sums = {"n": 0.0, "clipped": 0.0, "ratio_sum": 0.0, "kl_sum": 0.0, "ratio_min": inf, "ratio_max": -inf,
            "gap_sum": 0.0, "gap_n": 0.0, "gap_max": 0.0, **stats, **gap, "tokens": tokens, "loss_sum": sum(losses)}
    sums = {k: (None if isinstance(v, float) and math.isinf(v) else v)
            for k, v in trainer.all_reduce(sums).items()}
    steps = len(minis)
    metrics = {
        "loss": sums["loss_sum"] / steps,
        **L.reduce_stats(sums),
        "grad_norm": sum(norms) / len(norms),
        "grad_norm_max": max(norms),
        "tokens": int(sums["tokens"]),
        "policy_tokens": sum(ex.policy_tokens for ex in examples),
        "trajectories": len(examples),
        "steps": steps,
        "lr": cfg.lr,
        "logprob_gap": {"mean_abs": sums.get("gap_sum", 0.0) / sums["gap_n"] if sums.get("gap_n") else None,
                        "max": sums.get("gap_max") if sums.get("gap_n") else None,
                        "tokens": int(sums.get("gap_n", 0))},
    }
    if not cfg.beta or ref is None:
        metrics["kl"] = None
    metrics["train_seconds"] = round(train_seconds, 3)  # forward/backward/steps only
    metrics["train_cpu_seconds"] = round(train_cpu, 3)
    return metrics


def write_checkpoint(session: Session, out: str, examples, metrics: dict, *, parent: str, parent_fingerprint: str | None,
                     step: int, extra: dict | None = None) -> str:
    """Save the trained weights as an HF checkpoint at `out` (rank 0 writes); its fingerprint on every rank."""
    cfg, trainer, policy = session.cfg, session.trainer, session.policy
    meta = {
        "step": step,
        "parent": parent,
        "parent_fingerprint": parent_fingerprint,
        "batch_hash": batch_hash(examples),
        "kind": "update",
        **(extra or {}),
        "metrics": metrics,
        "flags": {**asdict(cfg), "micro_batch_tokens": session.budget, "eps_low": session.eps_low,
                  "eps_high": session.eps_high, "world_size": trainer.world, "bf16": session.bf16},
    }
    state = trainer.full_state_dict()
    fp = None
    if trainer.rank == 0:
        fp = save_checkpoint(out, trainer.model, state, source=cfg.policy, meta=meta, arch=policy.arch)
    return _shared(trainer, fp)


def run_update(paths, cfg: UpdateConfig, *, skip_bad: bool = False, trainer_hook=None) -> dict:
    """Train one batch and write the checkpoint; return the metrics record (all ranks)."""
    return update_once(paths, cfg, skip_bad=skip_bad, trainer_hook=trainer_hook)[0]


def update_once(paths, cfg: UpdateConfig, *, skip_bad: bool = False, trainer_hook=None) -> tuple[dict, Session]:
    """run_update, also returning the session: its model as it is after the step (the push probe's reference)."""
    from mars_cli.jsonl import read_located
    from mars_cli.rl.sampled_by import SampledBy

    t0 = time.time()
    _check_flags(cfg)
    session = load_session(cfg)
    sampled_by = SampledBy()
    examples = read_examples(read_located(paths, skip_bad=skip_bad), session, sampled_by)
    resume_state(session.trainer, cfg.state, session.policy)
    metrics = train_step(session, examples, trainer_hook=trainer_hook)
    metrics["sampled_by"] = sampled_by.report(session.policy.fingerprint)
    metrics["rewards"] = sampled_by.rewards()
    parent = read_meta(cfg.policy)
    step = int(parent.get("step", 0)) + metrics["steps"]
    timing = {k: metrics.pop(k) for k in ("train_seconds", "train_cpu_seconds")}
    fp = write_checkpoint(session, cfg.out, examples, metrics, parent=cfg.policy,
                          parent_fingerprint=session.policy.fingerprint, step=step)
    if cfg.state:
        session.trainer.save_state(cfg.state, {"step": step, "fingerprint": fp, "checkpoint": cfg.out})
    metrics["seconds"] = round(time.time() - t0, 3)
    metrics.update(timing)
    return {"kind": "update", "out": cfg.out, "step": step, "fingerprint": fp, **metrics}, session


def resume_state(trainer, state_dir, policy) -> None:
    """Load the optimizer state of `state_dir` if it has one, after checking it is the policy's."""
    from mars_cli.rl.engine import read_state_meta

    meta = read_state_meta(state_dir) if state_dir else {}
    if not meta:
        return
    if meta.get("fingerprint") != policy.fingerprint:
        raise MarsError(f"{state_dir}: optimizer state belongs to checkpoint {meta.get('fingerprint')}, "
                        f"not to the policy {policy.path} ({policy.fingerprint}); pass that policy or a fresh --state")
    trainer.load_state(state_dir)


def _shared(trainer, value):
    """Rank 0's value on every rank."""
    if trainer.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
