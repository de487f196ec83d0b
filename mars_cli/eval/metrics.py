"""Benchmark metrics from judged trajectories: accuracy, Pass@k, tool use, turns, tokens.

One metrics record per benchmark (and per subset with `by`):

- `pass@1`: mean accuracy over all judged samples;
- with k > 1 samples per task (k = the fewest any task has): `avg@k`, the per-task mean
  accuracy averaged over tasks, and `pass@k`, the unbiased estimator
  mean over tasks of 1 − C(n − c, k) / C(n, k) (n judged samples, c correct ones, where
  correct means accuracy ≥ 0.5); `pass_at` has it for k = 1, 2, 4, … up to k;
- `missing`: samples whose accuracy is absent or null (not judged, or the judge failed).
  They are left out of every accuracy figure, never counted as wrong;
- `format`: mean rewards.format, or when a record has none, 1 if it ended in an answer
  with every tool call valid; `reward`: mean reward over records that have one;
- `errors`: episodes that ended `finish: "error"` (the engine or the environment failed,
  not the model: a missing image, an unreachable server). A run where they abound is
  broken, not bad, so the table shows them in their own column;
- tool use per episode (all and per tool), the invalid call rate (failed calls over all
  calls), assistant turns, finish reasons, tokens generated (mask 1) and total.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from math import comb
from typing import Iterable

from mars_cli.errors import RecordError

CORRECT = 0.5  # accuracy at or above this counts as correct for pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task: chance that k of the n samples include a correct one."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class Episode:
    """What one trajectory contributes."""

    group: str
    accuracy: float | None
    format: float
    reward: float | None
    calls: Counter
    invalid: int
    turns: int
    finish: str
    generated: int | None
    total: int | None
    error: str | None = None


def episode(rec: dict) -> Episode:
    rewards = rec.get("rewards") if isinstance(rec.get("rewards"), dict) else {}
    acc = rewards.get("accuracy")
    calls = rec.get("tool_calls") or []
    invalid = sum(1 for c in calls if not c.get("ok"))
    fmt = rewards.get("format")
    if fmt is None:
        fmt = float(rec.get("finish") == "answer" and bool(rec.get("prediction")) and invalid == 0)
    tokens = rec.get("tokens")
    gen = total = None
    if isinstance(tokens, dict) and isinstance(tokens.get("ids"), list):
        total = len(tokens["ids"])
        gen = int(sum(tokens.get("mask") or []))
    return Episode(
        group=str(rec.get("group", rec.get("id"))),
        accuracy=None if acc is None else float(acc),
        format=float(fmt),
        reward=None if rec.get("reward") is None else float(rec["reward"]),
        calls=Counter(str(c.get("name")) if c.get("name") else "(invalid)" for c in calls),
        invalid=invalid,
        turns=sum(1 for m in rec.get("messages") or [] if m.get("role") == "assistant"),
        finish=str(rec.get("finish")),
        generated=gen,
        total=total,
        error=str(rec["error"]) if rec.get("finish") == "error" and rec.get("error") else None,
    )


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class Subset:
    """Episodes of one benchmark (or one subset of it)."""

    episodes: list[Episode] = field(default_factory=list)

    def summary(self) -> dict:
        eps = self.episodes
        by_task: dict[str, list[float]] = defaultdict(list)
        for e in eps:
            if e.accuracy is not None:
                by_task[e.group].append(e.accuracy)
        judged = [a for accs in by_task.values() for a in accs]
        out: dict = {
            "episodes": len(eps),
            "tasks": len({e.group for e in eps}),
            "judged": len(judged),
            "missing": len(eps) - len(judged),
            "pass@1": _mean(judged),
            "errors": sum(1 for e in eps if e.finish == "error"),
            "first_errors": list(dict.fromkeys(e.error for e in eps if e.error))[:3],
        }
        k = min((len(v) for v in by_task.values()), default=0)
        out["k"] = k
        if k > 1:
            out["avg@k"] = _mean([sum(v) / len(v) for v in by_task.values()])
            ks = sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k})
            out["pass_at"] = {
                str(j): _mean([pass_at_k(len(v), sum(a >= CORRECT for a in v), j) for v in by_task.values()]) for j in ks
            }
            out["pass@k"] = out["pass_at"][str(k)]
        n = len(eps) or 1
        calls = sum((e.calls for e in eps), Counter())
        n_calls = sum(calls.values())
        toks = [e for e in eps if e.total is not None]
        out.update({
            "format": _mean([e.format for e in eps]),
            "reward": _mean([e.reward for e in eps if e.reward is not None]),
            "tool_calls": n_calls / n,
            "tool_calls_by_tool": {name: calls[name] / n for name in sorted(calls)},
            "invalid_call_rate": (sum(e.invalid for e in eps) / n_calls) if n_calls else None,
            "turns": _mean([e.turns for e in eps]),
            "finish": dict(sorted(Counter(e.finish for e in eps).items())),
            "tokens_generated": _mean([e.generated for e in toks]),
            "tokens_total": _mean([e.total for e in toks]),
            "tokens_episodes": len(toks),
        })
        return out


def _subset_value(rec: dict, name: str) -> str:
    v = rec[name] if name in rec else (rec.get("meta") or {}).get(name)
    if v is None:
        return "(none)"
    return v if isinstance(v, str) else str(v)


def compute_metrics(items: Iterable[tuple[object, dict]], *, by: list[str] = (), label: str | None = None) -> list[dict]:
    """(where, judged trajectory) pairs → metrics records, per benchmark then per subset."""
    from mars_cli.records import validate

    subsets: dict[tuple, Subset] = defaultdict(Subset)
    seen: dict[tuple, object] = {}
    for where, rec in items:
        rec = validate(rec, "trajectory", where)
        for name in ("rewards", "reward"):
            if name in rec:
                validate(rec, "judged", where, only=(name,))
        bench = str(rec.get("benchmark") or "unknown")
        key = (bench, str(rec["group"]), rec["sample"])
        if key in seen:
            raise _located(where, f"duplicate sample {rec['sample']} of group {rec['group']!r} (first at {seen[key]})")
        seen[key] = where
        ep = episode(rec)
        subsets[(bench, None, None)].episodes.append(ep)
        for name in by:
            subsets[(bench, name, _subset_value(rec, name))].episodes.append(ep)
    out = []
    for (bench, name, value), sub in sorted(subsets.items(), key=lambda kv: (kv[0][0], kv[0][1] or "", kv[0][2] or "")):
        rec = {"kind": "metrics", "benchmark": bench}
        if label is not None:
            rec["label"] = label
        rec["by"] = name
        rec["subset"] = value
        rec.update(sub.summary())
        out.append(rec)
    return out


def _located(where, message: str):
    if hasattr(where, "error"):
        return where.error(message)
    return RecordError(str(where), None, message)


def _fmt(v, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def format_table(records: list[dict]) -> str:
    """The metrics as a fixed-width table for a person (stderr)."""
    head = ["benchmark", "subset", "n", "missing", "error", "pass@1", "pass@k", "format", "calls/ep", "invalid%", "turns", "gen tok"]
    rows = [head]
    for r in records:
        subset = "all" if r["by"] is None else f"{r['by']}={r['subset']}"
        passk = f"{_fmt(r.get('pass@k'))} (k={r['k']})" if r.get("pass@k") is not None else "-"
        rows.append([
            r["benchmark"] + (f" [{r['label']}]" if r.get("label") else ""), subset, str(r["episodes"]), str(r["missing"]), str(r.get("errors", 0)),
            _fmt(r["pass@1"]), passk, _fmt(r["format"]), _fmt(r["tool_calls"], False), _fmt(r["invalid_call_rate"]),
            _fmt(r["turns"], False), "-" if r["tokens_generated"] is None else f"{r['tokens_generated']:.0f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows)


def problems(records: list[dict]) -> tuple[list[str], str | None]:
    """What a person must hear about these metrics: (warnings, fatal message or None).

    Fatal: no record carries an accuracy (nothing was judged, so there is no score).
    Warnings: episodes that ended in an error (with the first few messages) and records
    left unjudged, which a pass@1 over the rest would hide.
    """
    overall = [r for r in records if r["by"] is None]
    n = sum(r["episodes"] for r in overall)
    judged = sum(r["judged"] for r in overall)
    failed = sum(r["errors"] for r in overall)
    warnings = []
    if failed:
        first = "; ".join(dict.fromkeys(m for r in overall for m in r["first_errors"]))[:300]
        warnings.append(f"{failed} of {n} episodes ended with finish \"error\"" + (f": {first}" if first else ""))
    if judged and judged < n:
        warnings.append(f"{n - judged} of {n} episodes have no accuracy (not judged, or the judge failed); "
                        f"pass@1 is over the other {judged}")
    fatal = None
    if n and not judged:
        fatal = (f"none of the {n} records carries an accuracy (rewards.accuracy): "
                 "run them through `mars judge` first" + (f"; {failed} ended with an error" if failed else ""))
    return warnings, fatal
