"""Cold-start SFT: next-token NLL on the assistant tokens of trajectory records.

    run_sft(["teacher.jsonl"], SFTConfig(policy="base/", out="sft/"), on_epoch=print) -> records

Records with token ids train on exactly those ids; records without (teacher trajectories
from the openai engine, reference trajectories of the synthetic benchmark) are rendered
from their messages by the protocol's Renderer, which masks prompt, tool and template
tokens. The same DeepSpeed machinery, micro-batching and checkpoint format as `update`;
learning rate with linear warmup then cosine decay; one metrics record per epoch with the
data's NLL before and after it.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

from mars_cli import streams
from mars_cli.errors import MarsError, UsageError
from mars_cli.rl import batching, loss as L
from mars_cli.rl.checkpoint import read_meta, save_checkpoint


@dataclass
class SFTConfig:
    policy: str
    out: str
    state: str | None = None
    epochs: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 8  # trajectories per optimizer step
    micro_batch_tokens: int | None = None  # None: 4096 on a GPU, 1024 on a CPU
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.0
    max_steps: int | None = None
    min_reward: float | None = None
    max_seq_len: int | None = None  # None: the model's context length (max_position_embeddings)
    zero: int = 0
    deepspeed: str | None = None
    train_vision: bool = False
    gradient_checkpointing: bool = False
    bf16: bool | None = None
    seed: int = 0
    eval: bool = True
    attn_implementation: str | None = None  # None: transformers' default (sdpa)
    min_pixels: int | None = None  # image pixel limits for records without policy.pixels
    max_pixels: int | None = None


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check(cfg: SFTConfig) -> None:
    from mars_cli.rl.update import check_out

    check_out(cfg.out, cfg.policy)
    if cfg.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if cfg.batch_size < 1 or (cfg.micro_batch_tokens is not None and cfg.micro_batch_tokens < 1):
        raise UsageError("--batch-size and --micro-batch-tokens must be positive")
    if not 0 <= cfg.warmup < 1:
        raise UsageError("--warmup is a fraction of the steps, in [0, 1)")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UsageError("--max-steps must be at least 1")


def _within_length(examples: list, lengths: list[int], limit: int | None) -> tuple[list, list[int]]:
    """Drop, with a warning naming its line, each example longer than `limit` tokens: one
    runaway message (a million tokens) would otherwise train alone for minutes, or beyond
    the positions the model knows."""
    if limit is None:
        return examples, lengths
    keep = []
    for i, n in enumerate(lengths):
        if n > limit:
            streams.warn(f"{examples[i].where}: skipped: {n:,} tokens, over --max-seq-len {limit:,}")
        else:
            keep.append(i)
    if not keep:
        raise MarsError(f"no trajectories within --max-seq-len {limit:,} tokens")
    return [examples[i] for i in keep], [lengths[i] for i in keep]


def run_sft(paths, cfg: SFTConfig, *, skip_bad: bool = False, on_epoch=None) -> list[dict]:
    """Train, write the checkpoint, return the per-epoch records (also passed to on_epoch)."""
    import torch

    from mars_cli.jsonl import read_located
    from mars_cli.models.load import context_length
    from mars_cli.protocol import Renderer
    from mars_cli.rl.engine import Trainer
    from mars_cli.rl.update import _shared, batch_hash, prepare_policy, resume_state, token_budget

    _check(cfg)
    t0 = time.time()
    policy, bf16 = prepare_policy(cfg.policy, train_vision=cfg.train_vision,
                                  gradient_checkpointing=cfg.gradient_checkpointing, bf16=cfg.bf16, seed=cfg.seed,
                                  attn_implementation=cfg.attn_implementation, min_pixels=cfg.min_pixels,
                                  max_pixels=cfg.max_pixels)
    renderer = Renderer(policy.tokenizer, policy.special)
    examples = batching.sft_examples(read_located(paths, skip_bad=skip_bad), renderer, policy.special["image_pad"],
                                     min_reward=cfg.min_reward, vocab_size=policy.model.get_input_embeddings().num_embeddings)
    cache: dict = {}
    lengths = [batching.expanded_length(policy, ex, cache) for ex in examples]
    examples, lengths = _within_length(examples, lengths, cfg.max_seq_len or context_length(policy.model))
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = int(round(cfg.warmup * total))
    trainer = Trainer(policy.model, zero=cfg.zero, config_file=cfg.deepspeed, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      grad_clip=cfg.grad_clip, bf16=bf16,
                      schedule=lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    resume_state(trainer, cfg.state, policy)
    rank, world = trainer.rank, trainer.world
    budget = token_budget(cfg.micro_batch_tokens, policy)

    has_images = [bool(ex.images) for ex in examples] if trainer.stage == 3 else None

    def plan(indices):
        return batching.rank_plan(indices, lengths, budget, rank, world, has_images)

    def data_nll() -> float | None:
        if not cfg.eval:
            return None
        acc: dict = {}
        groups = plan(list(range(len(examples))))
        for j, (group, w) in enumerate(groups):
            with torch.no_grad():
                lp, mask, _ = batching.micro_logprobs(policy, [examples[i] for i in group], model=trainer.model,
                                                      upcoming=batching.upcoming(examples, groups, j))
            if w:
                L.merge_stats(acc, L.nll(lp.float(), mask).stats)
        acc = trainer.all_reduce({"n": acc.get("n", 0.0), "nll_sum": acc.get("nll_sum", 0.0)})
        return acc["nll_sum"] / acc["n"] if acc["n"] else None

    records: list[dict] = []
    step = 0
    before = data_nll()
    rng = random.Random(cfg.seed)
    bar = streams.progress(total=total, desc="sft", unit="steps", disable=rank != 0)
    for epoch in range(1, cfg.epochs + 1):
        if step >= total:
            break
        order = list(range(len(examples)))
        rng.shuffle(order)
        ep: dict = {}
        norms, tokens, te = [], 0, time.time()
        for mb in batching.minibatches(len(order), cfg.batch_size):
            if step >= total:
                break
            idx = [order[i] for i in mb]
            denom = max(1, sum(examples[i].policy_tokens for i in idx))
            groups = plan(idx)
            for j, (group, w) in enumerate(groups):
                lp, mask, ntok = batching.micro_logprobs(policy, [examples[i] for i in group], model=trainer.model,
                                                         grad=True, upcoming=batching.upcoming(examples, groups, j))
                out = L.nll(lp.float(), mask, denom=denom)
                if w and not math.isfinite(float(out.loss.detach())):
                    raise MarsError(f"non-finite loss at step {step + 1}: nothing written")
                trainer.backward(out.loss * (w * world), last=j == len(groups) - 1)
                if w:
                    tokens += ntok
                    L.merge_stats(ep, out.stats)
            lr_used = trainer.lr()
            norms.append(trainer.step())
            step += 1
            bar.update(1)
        ep = trainer.all_reduce({"n": ep.get("n", 0.0), "nll_sum": ep.get("nll_sum", 0.0), "tokens": tokens})
        after = data_nll()
        records.append({"kind": "sft", "epoch": epoch, "steps": step, "nll_before": before, "nll_after": after,
                        "train_nll": ep["nll_sum"] / ep["n"] if ep["n"] else None,
                        "grad_norm": sum(norms) / len(norms) if norms else None, "lr": lr_used if norms else None,
                        "tokens": int(ep["tokens"]), "trajectories": len(examples),
                        "seconds": round(time.time() - te, 3)})
        before = after
        if epoch < cfg.epochs and step < total and on_epoch is not None:
            on_epoch(records[-1])

    bar.close()
    parent = read_meta(cfg.policy)
    meta = {"step": int(parent.get("step", 0)) + step, "parent": cfg.policy, "parent_fingerprint": policy.fingerprint,
            "batch_hash": batch_hash(examples), "kind": "sft", "metrics": records,
            "flags": {**asdict(cfg), "micro_batch_tokens": budget, "world_size": world, "bf16": bf16, "total_steps": total, "warmup_steps": warmup}}
    state = trainer.full_state_dict()
    fp = save_checkpoint(cfg.out, trainer.model, state, source=cfg.policy, meta=meta, arch=policy.arch) if rank == 0 else None
    fp = _shared(trainer, fp)
    if cfg.state:
        trainer.save_state(cfg.state, {"step": meta["step"], "fingerprint": fp, "checkpoint": cfg.out})
    records[-1].update(out=cfg.out, fingerprint=fp, seconds_total=round(time.time() - t0, 3))
    if on_epoch is not None:
        on_epoch(records[-1])
    return records
