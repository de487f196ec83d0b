"""Records → training examples, mini-batches, rank shards and token-budget micro-batches.

`update` trains on exactly the token ids a rollout sampled (`tokens.ids`, one image pad per
image, `tokens.images` in placeholder order); records without ids (the openai engine's) are
refused with their file:line. `sft` also accepts such records: their messages are rendered
through the protocol's Renderer, which masks everything but the assistant's own tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from mars_cli.errors import MarsError
from mars_cli.records import DuplicateCheck, validate


@dataclass
class Example:
    """One trajectory as the trainer sees it."""

    ids: list
    mask: list
    images: list
    advantage: float = 0.0
    rollout_logprobs: list | None = None
    where: object = None  # jsonl.Where, for error messages
    pixels: tuple | None = None  # (min, max) pixel limits the rollout's image processor used

    @property
    def policy_tokens(self) -> int:
        return sum(1 for m in self.mask if m)


def _resolve_image(path: str, where) -> str:
    """A stored image path: beside the batch file, else as written (see mars_cli.paths)."""
    from mars_cli.paths import resolve

    return resolve(path, where)


def _check_tokens(ids, mask, images, image_pad: int, where, vocab_size: int | None = None) -> None:
    if not ids:
        raise where.error("tokens.ids is empty: nothing to train on")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise where.error("tokens.ids must be non-negative integers")
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        bad = max(ids)
        raise where.error(f"tokens.ids holds token {bad} (at position {ids.index(bad)}), beyond the policy's "
                          f"vocabulary of {vocab_size}: the record was sampled from another model")
    if not all(m in (0, 1) for m in mask):
        raise where.error("tokens.mask must hold only 0 and 1")
    pads = sum(1 for t in ids if t == image_pad)
    if pads != len(images):
        raise where.error(f"tokens.ids has {pads} image placeholder{'s' if pads != 1 else ''} "
                          f"but tokens.images lists {len(images)} image{'s' if len(images) != 1 else ''}")


def record_pixels(rec: dict, where) -> tuple[int, int] | None:
    """policy.pixels of a trajectory record as (min, max), or None when it has none."""
    pol = rec.get("policy")
    px = pol.get("pixels") if isinstance(pol, dict) else None
    if px is None:
        return None
    ok = isinstance(px, dict) and all(isinstance(px.get(k), int) and not isinstance(px.get(k), bool) and px[k] > 0
                                      for k in ("min", "max"))
    if not ok or px["min"] > px["max"]:
        raise where.error(f"policy.pixels must be {{\"min\": int, \"max\": int}} with 0 < min <= max, got {px!r}")
    return px["min"], px["max"]


def update_examples(located: Iterable, image_pad: int, *, vocab_size: int | None = None) -> list[Example]:
    """Scored trajectory records (with token ids and an advantage) → examples.

    A trajectory without any policy token (rollout writes those when the prompt alone
    fills the budget) has nothing to train on: skipped with a warning. Token ids beyond
    `vocab_size` and duplicate (group, sample) pairs are errors, found before any step.
    """
    from mars_cli import streams

    out = []
    skipped = 0
    duplicate = DuplicateCheck()
    for where, rec in located:
        validate(rec, "scored", where, only=("tokens", "advantage"))
        tok = rec.get("tokens")
        if not tok or tok.get("ids") is None:
            raise where.error("trajectory has no token ids (tokens is null, as from the openai engine): "
                              "update trains on sampled ids only; use `mars sft` for such records")
        duplicate(rec, where)
        ids, mask = tok["ids"], tok["mask"]
        images = [_resolve_image(str(p), where) for p in (tok.get("images") or [])]
        _check_tokens(ids, mask, images, image_pad, where, vocab_size)
        lp = tok.get("logprobs")
        if lp is not None and not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in lp):
            raise where.error("tokens.logprobs must be finite numbers")
        if not any(mask):
            streams.warn(f"{where}: skipped: the trajectory has no policy tokens (finish {rec.get('finish')!r})")
            skipped += 1
            continue
        out.append(Example(ids, mask, images, float(rec["advantage"]), lp, where, record_pixels(rec, where)))
    if not out:
        raise MarsError("no trajectories in the batch" + (f" with policy tokens ({skipped} without)" if skipped else ""))
    return out


def sft_examples(located: Iterable, renderer, image_pad: int, *, min_reward: float | None = None,
                 vocab_size: int | None = None) -> list[Example]:
    """Trajectory records → examples; records without token ids are rendered from messages."""
    out = []
    for where, rec in located:
        if min_reward is not None:
            validate(rec, "judged", where, only=("reward",))
            r = rec.get("reward")
            if r is None or r < min_reward:
                continue
        tok = rec.get("tokens")
        if tok and tok.get("ids") is not None:
            validate(rec, "trajectory", where, only=("tokens",))
            ids, mask = tok["ids"], tok["mask"]
            images = [_resolve_image(str(p), where) for p in (tok.get("images") or [])]
        else:
            validate(rec, "trajectory", where, only=("messages",))
            for i, m in enumerate(rec["messages"]):
                try:
                    renderer.check(m)  # trained as rendered: a role or a part the template would drop is an error
                except ValueError as e:
                    raise where.error(f"messages[{i}]: {e}") from None
            try:
                ids, mask, images = renderer.render(rec["messages"], add_generation_prompt=False)
            except (KeyError, TypeError, AttributeError) as e:
                raise where.error(f"messages cannot be rendered: {type(e).__name__}: {e}") from None
            images = [_resolve_image(p, where) for p in images]
        _check_tokens(ids, mask, images, image_pad, where, vocab_size)
        if not any(mask):
            raise where.error("trajectory has no assistant tokens to train on")
        out.append(Example(list(ids), list(mask), images, 0.0, None, where, record_pixels(rec, where)))
    if not out:
        raise MarsError("no trajectories to train on" + (f" with reward >= {min_reward}" if min_reward is not None else ""))
    return out


def minibatches(n: int, size: int | None) -> list[list[int]]:
    """Consecutive chunks of `size` indices (all in one when size is None or ≥ n)."""
    if size is None or size >= n:
        return [list(range(n))]
    if size < 1:
        raise MarsError(f"--batch-size must be at least 1, got {size}")
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's share of a mini-batch: every world-th item, starting at rank."""
    return list(indices[rank::world])


def pack(indices: Sequence[int], lengths: Callable[[int], int], budget: int) -> list[list[int]]:
    """Group indices into micro-batches whose padded size (rows × longest) fits `budget`.

    Longest first, so each micro-batch holds sequences of similar length and padding stays
    small; a sequence longer than the budget trains alone (it cannot be split).
    """
    order = sorted(indices, key=lambda i: (-lengths(i), i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths(groups[-1][0]) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def rank_plan(indices: Sequence[int], lengths: Sequence[int], budget: int, rank: int, world: int,
              has_images: Sequence[bool] | None = None) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a mini-batch as (indices, weight), the same count on every rank.

    Ranks must run the same number of forward/backward passes (gradient reduction and ZeRO-3
    parameter gathering are collective), so a rank with fewer micro-batches repeats one of
    its own with weight 0. With `has_images`, each rank runs its micro-batches that hold
    images first, so they line up across ranks: a micro-batch without images beside one
    with images on another rank costs a filler run of the vision tower (micro_logprobs).
    """
    per_rank = [pack(shard(indices, r, world), lengths.__getitem__, budget) for r in range(world)]
    if has_images is not None:
        per_rank = [sorted(groups, key=lambda g: not any(has_images[i] for i in g)) for groups in per_rank]
    n = max(len(p) for p in per_rank)
    padded = []
    for groups in per_rank:
        filler = groups[0] if groups else [indices[0]]
        padded.append([(g, 1.0) for g in groups] + [(filler, 0.0)] * (n - len(groups)))
    return padded[rank]


def _vision_is_collective(net) -> bool:
    """Whether running the vision tower takes every rank: ZeRO-3 gathers its weights in each
    forward, and a trained tower's gradient is reduced over ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    visual = [p for name, p in net.named_parameters() if ".visual." in f".{name}"]
    return any(hasattr(p, "ds_id") or p.requires_grad for p in visual)


def _any_rank(flag: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def pad_rows(rows: Sequence, value: float = 0.0):
    """Per-sequence 1-D tensors → one [B, T] tensor, right-padded with `value` (keeps autograd)."""
    from torch.nn.utils.rnn import pad_sequence

    return pad_sequence(list(rows), batch_first=True, padding_value=value)


def micro_logprobs(policy, examples: Sequence[Example], *, model=None, grad: bool = False,
                   upcoming: Sequence[Example] | None = None):
    """One micro-batch forward: per-token log-probs and mask as [B, T] tensors (mask 1 only scored).

    `upcoming`: the micro-batch the caller runs next; its input (images decoded, resized,
    patchified) is built in a background thread while this one computes (rl.prefetch).
    """
    import torch

    from mars_cli.models.logprobs import token_logprobs, unwrap_model
    from mars_cli.rl.prefetch import PREFETCHER, build_for

    seqs = [(ex.ids, ex.images) for ex in examples]
    net = unwrap_model(model if model is not None else policy.model)
    filler = False
    if _vision_is_collective(net):
        # Every rank runs the vision tower in this forward or none does.
        mine = any(ex.images for ex in examples)
        filler = _any_rank(mine, next(net.parameters()).device) and not mine
    batch = PREFETCHER.take(policy, examples)
    if upcoming and prefetch_enabled():
        PREFETCHER.submit(policy, upcoming)
    if batch is None or filler:  # a filler batch has no images of its own: cheap to build here
        batch = build_for(policy, examples, vision_filler=filler)
    lps = token_logprobs(policy, seqs, grad=grad, model=model, masks=[ex.mask for ex in examples], batch=batch)
    logp = pad_rows(lps)
    mask = pad_rows([torch.tensor(ex.mask, dtype=torch.float32) for ex in examples]).to(logp.device)
    return logp, mask, sum(batch.lengths)


def prefetch_enabled() -> bool:
    """MARS_PREFETCH=0 builds every micro-batch's input inline (for comparison and debugging)."""
    return os.environ.get("MARS_PREFETCH", "1") not in ("0", "false", "no")


def upcoming(examples: Sequence[Example], groups: Sequence, j: int) -> list[Example] | None:
    """The examples of micro-batch j+1 of a rank plan (None after the last), for micro_logprobs."""
    return [examples[i] for i in groups[j + 1][0]] if j + 1 < len(groups) else None


def expanded_length(policy, ex: Example, cache: dict | None = None) -> int:
    """The sequence's length once each image pad is expanded to its patch count."""
    from mars_cli.models.inputs import image_tokens

    cache = {} if cache is None else cache
    extra = 0
    for im in ex.images:
        key = (im, ex.pixels)
        if key not in cache:
            cache[key] = image_tokens(policy, im, ex.pixels)
        extra += cache[key] - 1
    return len(ex.ids) + extra
