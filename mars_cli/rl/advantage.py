"""Advantage estimators (pure numpy) and the `mars advantage` stage around them.

Every estimator has ONE contract:

    estimator(rewards: float64[n], groups: int64[n] codes 0..G-1, cfg) -> GroupResult

with per-trajectory advantages and per-group mean/std/size. The registry maps names to an
estimator plus whether the batch step follows by default:

    grpo      A = (r − mean_g) / (std_g + eps), std with `ddof` (1: unbiased)
    bn-gspo   grpo, then A ← (A − mean_B) / (std_B + batch_eps) over the whole scope,
              std_B with `batch_ddof` (0: population) — SenseNova-MARS's second step
    dr-grpo   A = r − mean_g (no std division)
    rloo      A = r_i − mean_{j≠i} r_j (leave-one-out baseline)
    grpo-batch-std  A = (r − mean_g) / (std of all rewards of the scope + eps)

Other frameworks' settings, reproduced: verl's GRPO (norm_adv_by_std_in_grpo) is `grpo`
(unbiased std, eps 1e-6); TRL's GRPO is `grpo --eps 1e-4` with scale_rewards="group",
`grpo-batch-std --eps 1e-4` with scale_rewards="batch", `dr-grpo` with "none"; per
training step means `--batch-groups` = that step's number of prompts.

A group whose rewards are all equal gets exactly 0 (not a float residue / eps). A group of
one has std 0 and gets 0. The batch step needs the statistics of the whole scope, so the
stage buffers it: the whole input by default, or batches of `batch_groups` groups (streamed
batch by batch while groups are contiguous).

Every written record carries its batch, `batch: {id, size}`, which is what a resident
trainer (`mars update --follow`) steps on: `size` says when the batch's last record has
arrived, and `id` is a hash of the batch's content (each record's group, sample and
reward, in order, plus the settings), so the same input always gives the same ids and
two different batches never share one.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from mars_cli import streams
from mars_cli.records import SCHEMA_VERSION, DuplicateCheck, validate

FIELDS = ("advantage", "advantage_stats", "batch")


@dataclass(frozen=True)
class AdvantageConfig:
    algo: str = "bn-gspo"
    ddof: int = 1
    eps: float = 1e-6
    batch_norm: bool | None = None  # None: the algorithm's default
    batch_ddof: int = 0
    batch_eps: float = 1e-9

    def use_batch_norm(self) -> bool:
        return ESTIMATORS[self.algo][1] if self.batch_norm is None else self.batch_norm


@dataclass
class GroupResult:
    advantage: np.ndarray  # per trajectory
    mean: np.ndarray  # per group
    std: np.ndarray  # per group, with cfg.ddof (0 for groups too small for it)
    size: np.ndarray  # per group
    constant: np.ndarray  # per group: all rewards equal
    extra: dict | None = None  # scalars the estimator used beyond group moments (recorded)


def group_moments(r: np.ndarray, g: np.ndarray, ddof: int):
    """Per-group size, mean, std (ddof) and constancy, vectorized with bincount."""
    n_groups = int(g.max()) + 1 if len(g) else 0
    size = np.bincount(g, minlength=n_groups).astype(np.float64)
    mean = np.bincount(g, weights=r, minlength=n_groups) / np.maximum(size, 1)
    dev = r - mean[g]
    ss = np.bincount(g, weights=dev * dev, minlength=n_groups)
    dof = size - ddof
    std = np.sqrt(np.divide(ss, dof, out=np.zeros_like(ss), where=dof > 0))
    lo = np.full(n_groups, np.inf)
    hi = np.full(n_groups, -np.inf)
    np.minimum.at(lo, g, r)
    np.maximum.at(hi, g, r)
    return size, mean, std, lo == hi


def group_zscore(r: np.ndarray, g: np.ndarray, cfg: AdvantageConfig) -> GroupResult:
    size, mean, std, const = group_moments(r, g, cfg.ddof)
    with np.errstate(divide="ignore", invalid="ignore"):  # eps may be 0: constant groups are zeroed next
        adv = (r - mean[g]) / (std[g] + cfg.eps)
    adv[const[g]] = 0.0
    return GroupResult(adv, mean, std, size, const)


def group_center(r: np.ndarray, g: np.ndarray, cfg: AdvantageConfig) -> GroupResult:
    size, mean, std, const = group_moments(r, g, cfg.ddof)
    adv = r - mean[g]
    adv[const[g]] = 0.0
    return GroupResult(adv, mean, std, size, const)


def leave_one_out(r: np.ndarray, g: np.ndarray, cfg: AdvantageConfig) -> GroupResult:
    size, mean, std, const = group_moments(r, g, cfg.ddof)
    total = np.bincount(g, weights=r, minlength=len(size))
    others = size[g] - 1
    baseline = np.divide(total[g] - r, others, out=r.copy(), where=others > 0)
    adv = r - baseline
    adv[const[g]] = 0.0
    return GroupResult(adv, mean, std, size, const)


def group_center_batch_scale(r: np.ndarray, g: np.ndarray, cfg: AdvantageConfig) -> GroupResult:
    """TRL's scale_rewards="batch": centre per group, divide by the std of all rewards."""
    size, mean, std, const = group_moments(r, g, cfg.ddof)
    r_std = float(r.std(ddof=cfg.ddof)) if len(r) > cfg.ddof else 0.0
    adv = (r - mean[g]) / (r_std + cfg.eps) if r_std + cfg.eps > 0 else np.zeros_like(r)
    adv[const[g]] = 0.0
    return GroupResult(adv, mean, std, size, const, {"reward_batch_mean": float(r.mean()), "reward_batch_std": r_std})


def batch_normalize(adv: np.ndarray, ddof: int, eps: float) -> tuple[np.ndarray, float, float]:
    """BN-GSPO's second step over every trajectory of the scope."""
    if len(adv) == 0:
        return adv, 0.0, 0.0
    mean = float(adv.mean())
    std = float(adv.std(ddof=ddof)) if len(adv) > ddof else 0.0
    return (adv - mean) / (std + eps), mean, std


# name -> (estimator, batch step on by default)
ESTIMATORS: dict[str, tuple[Callable[[np.ndarray, np.ndarray, AdvantageConfig], GroupResult], bool]] = {
    "grpo": (group_zscore, False),
    "bn-gspo": (group_zscore, True),
    "dr-grpo": (group_center, False),
    "rloo": (leave_one_out, False),
    "grpo-batch-std": (group_center_batch_scale, False),
}


def compute(rewards, groups, cfg: AdvantageConfig):
    """Advantages for one normalization scope; `groups` are any hashable keys.

    Returns (advantages float64[n], per-record stats dicts).
    """
    r = np.asarray(rewards, dtype=np.float64)
    keys: dict = {}
    g = np.fromiter((keys.setdefault(k, len(keys)) for k in groups), dtype=np.int64, count=len(r))
    res = ESTIMATORS[cfg.algo][0](r, g, cfg)
    adv, b_mean, b_std = res.advantage, None, None
    if cfg.use_batch_norm():
        adv, b_mean, b_std = batch_normalize(adv, cfg.batch_ddof, cfg.batch_eps)
    mean, std, size = res.mean.tolist(), res.std.tolist(), res.size.astype(np.int64).tolist()
    common = {"algo": cfg.algo, "ddof": cfg.ddof, "eps": cfg.eps, "batch_mean": b_mean, "batch_std": b_std}
    if b_mean is not None:
        common.update(batch_ddof=cfg.batch_ddof, batch_eps=cfg.batch_eps)
    common.update(res.extra or {})
    stats = [{**common, "group_mean": mean[i], "group_std": std[i], "group_size": size[i]} for i in g.tolist()]
    return adv, stats


@dataclass
class AdvantageStats:
    records: int = 0
    written: int = 0
    dropped_null: int = 0  # groups dropped for a null reward
    dropped_constant: int = 0  # groups dropped by --drop-constant-groups
    batches: int = 0


def batch_id(records: list, cfg: AdvantageConfig, drop_constant: bool) -> str:
    """Content id of one written batch: (group, sample, reward) of each record + the settings."""
    import orjson

    from mars_cli.fsutil import sha256_bytes

    settings = {**asdict(cfg), "use_batch_norm": cfg.use_batch_norm(), "drop_constant": drop_constant}
    rows = [[rec["group"], rec.get("sample"), rec["reward"]] for rec in records]
    return sha256_bytes(orjson.dumps({"settings": settings, "records": rows}, option=orjson.OPT_SORT_KEYS))[:16]


def _scope(items: list, cfg: AdvantageConfig, scope: str, *, drop_constant: bool, strict: bool, stats: AdvantageStats):
    """Compute one scope's advantages and yield its records (one batch) in input order."""
    null_at: dict = {}
    for where, rec, _ in items:
        if rec["reward"] is None:
            if strict:
                raise where.error(f"null reward in group {rec['group']!r} (judge it again, or drop --strict to skip the group)")
            null_at.setdefault(rec["group"], where)
    if null_at:
        stats.dropped_null += len(null_at)
        first = next(iter(null_at.items()))
        streams.warn(f"dropped {len(null_at)} group(s) with a null reward (first: {first[0]!r} at {first[1]})")
        items = [it for it in items if it[1]["group"] not in null_at]
    if drop_constant and items:
        by_group: dict = {}
        for _, rec, _ in items:
            by_group.setdefault(rec["group"], set()).add(rec["reward"])
        flat = {k for k, v in by_group.items() if len(v) == 1}
        stats.dropped_constant += len(flat)
        items = [it for it in items if it[1]["group"] not in flat]
    if not items:
        return
    adv, per = compute([it[1]["reward"] for it in items], [it[1]["group"] for it in items], cfg)
    stamp = {"id": batch_id([it[1] for it in items], cfg, drop_constant), "size": len(items)}
    stats.batches += 1
    for (_, rec, text), a, st in zip(items, adv.tolist(), per):
        st["scope"] = scope
        st["scope_size"] = len(items)
        rec["advantage"] = a
        rec["advantage_stats"] = st
        rec["batch"] = dict(stamp)
        stats.written += 1
        yield rec, text


def advantage_records(
    located: Iterable,
    cfg: AdvantageConfig,
    *,
    batch_groups: int | None = None,
    group_size: int | None = None,
    drop_constant: bool = False,
    strict: bool = False,
    stats: AdvantageStats | None = None,
) -> Iterator[tuple[dict, bytes | None]]:
    """Add `advantage`, `advantage_stats` and `batch` to judged (where, record) pairs, or
    to (where, record, text) triples from `read_located(with_text=True)`; yields (record, text).

    text None: write the record whole (`RecordWriter.write`). Otherwise the record holds
    only `group`, `sample`, `reward` and the new fields, and the line is `text` with the
    new fields added (`RecordWriter.write_extended`): a buffered batch then keeps each
    trajectory's JSON text (~4x smaller than its parsed token lists) and nothing is
    serialized again. Records that are not at the current schema version, or already hold
    one of the new fields (advantage run twice), are kept parsed and written whole.

    With `batch_groups` N a batch closes after N complete groups and is yielded at once. A
    group is complete when the next group starts, or, with `group_size` K, as soon as it
    holds K records (so the batch closes on its last record, not on the next batch's first).
    """
    stats = stats if stats is not None else AdvantageStats()
    # A buffered scope keeps thousands of parsed records alive; they survive into the
    # oldest GC generation, whose collections then walk every token list again and again
    # (~25% of the stage's CPU at 2k tokens). Parsed JSON holds no reference cycles, so
    # the cycle collector is paused while the stage runs.
    paused = gc.isenabled()
    gc.disable()
    try:
        kw = dict(drop_constant=drop_constant, strict=strict, stats=stats)
        yield from _stream(located, cfg, batch_groups, group_size, kw, stats)
    finally:
        if paused:
            gc.enable()


def _stream(located: Iterable, cfg: AdvantageConfig, batch_groups: int | None, group_size: int | None,
            kw: dict, stats: AdvantageStats) -> Iterator[dict]:
    chunk: list = []
    counts: dict = {}  # group -> records seen, for the groups of the open batch
    complete = 0  # groups of the open batch known to be complete
    closed: set = set()
    n_chunk = 0
    last = None
    duplicate = DuplicateCheck()
    for item in located:
        where, rec = item[0], item[1]
        rec = validate(rec, "judged", where, only=("group", "reward"))
        duplicate(rec, where)  # a trajectory read twice would weigh twice in its group's statistics
        text = item[2] if len(item) > 2 else None
        if text is not None and rec.get("schema_version") == SCHEMA_VERSION and not any(k in rec for k in FIELDS):
            rec = {"group": rec["group"], "sample": rec.get("sample"), "reward": rec["reward"]}
        else:
            text = None
        stats.records += 1
        key = rec["group"]
        if batch_groups is not None:
            if key in closed and group_size is not None:
                raise where.error(f"group {key!r} has more than --group-size {group_size} records, "
                                  "or reappears after its batch was written")
            if key in closed:
                raise where.error(f"group {key!r} reappears after its batch was written: with --batch-groups the "
                                  "records of a group must be contiguous (sort by group, or drop --batch-groups)")
            if key not in counts and last is not None and (group_size is None or counts[last] < group_size):
                complete += 1  # a new group starts: the previous one is complete
            if key not in counts and complete == batch_groups:
                yield from _scope(chunk, cfg, f"chunk:{n_chunk}", **kw)
                closed.update(counts)
                chunk, counts, complete, n_chunk = [], {}, 0, n_chunk + 1
            counts[key] = counts.get(key, 0) + 1
            if group_size is not None:
                if counts[key] > group_size:
                    raise where.error(f"group {key!r} has more than --group-size {group_size} records")
                if counts[key] == group_size:
                    complete += 1
            last = key
        chunk.append((where, rec, text))
        if batch_groups is not None and group_size is not None and complete == batch_groups:
            yield from _scope(chunk, cfg, f"chunk:{n_chunk}", **kw)
            closed.update(counts)
            chunk, counts, complete, n_chunk, last = [], {}, 0, n_chunk + 1, None
    if chunk:
        yield from _scope(chunk, cfg, "input" if batch_groups is None else f"chunk:{n_chunk}", **kw)
