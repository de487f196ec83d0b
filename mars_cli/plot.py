"""Training and eval curves from metrics records: one page (HTML, inline SVG) or one PNG.

    runs = load_runs(["sft.jsonl", "rl.jsonl", "eval.jsonl"])   # each file is one run
    write_plot(runs, "run.html")

What is drawn:
- training records (`kind` update or sft, or any record with a numeric `step`): each metric
  in TRAIN_METRICS against `step`, one line per run, runs overlaid in one panel;
- eval records (`kind: metrics`, the whole-benchmark row, not a --by subset): each metric in
  EVAL_METRICS per benchmark, one line per (run, benchmark). When every eval record names
  its training step (a `step` field, or a label ending in a number: `rl-16`, `step_16`),
  the points stand at that step on a training-step axis; otherwise by `label` in file
  order (the checkpoints in the order they were evaluated), beside the training panels.
A metric a run does not carry is left out, a record without it is skipped, and a panel
with no point at all is not drawn. Nested fields are read by dotted name
(`logprob_gap.mean_abs`). matplotlib draws both formats (Agg backend, no display).

What keeps a plot honest:
- rates (accuracy, format, clip fraction, pass@1, avg@k, invalid call rate) are drawn on a
  0–1 axis, so a 0.185 → 0.215 wobble does not look like a collapse; eval pass@1 also shows
  its n (judged samples) and a 95% Wilson interval per point;
- SFT records count seconds per epoch: the step time panel divides by the epoch's steps;
- a value beyond OFF_SCALE × the panel's typical size (or beyond MAX_SHOWN; a diverged
  `loss: 1e308`) is drawn as a red triangle at the axis edge and named in the panel's note,
  instead of stretching the axis until nothing else is visible (or matplotlib gives up).
"""

from __future__ import annotations

import html
import io
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mars_cli.errors import MarsError

# (panel title, candidate field names: the first one a record has is used)
TRAIN_METRICS = [
    ("reward", ("reward", "reward_mean", "rewards.reward", "batch.reward")),
    ("accuracy", ("accuracy", "rewards.accuracy", "pass@1")),
    ("format rate", ("format", "rewards.format", "format_rate")),
    ("tool calls per episode", ("tool_calls", "tools_per_episode")),
    ("loss", ("loss",)),
    ("SFT NLL", ("train_nll", "nll_after")),
    ("grad norm", ("grad_norm",)),
    ("KL", ("kl",)),
    ("clip fraction", ("clip_fraction",)),
    ("staleness", ("staleness.mean", "staleness", "staleness_mean")),
    ("step time (s)", ("step_seconds", "seconds")),
]
# Panels whose values are shares in [0, 1]: their axis shows the whole range.
RATES = {"accuracy", "format rate", "clip fraction", "pass@1", "avg@k", "invalid call rate"}
OFF_SCALE = 1e6   # a value this many times the panel's median magnitude (at least 1) is off scale
MAX_SHOWN = 1e15  # and so is any value beyond this, whatever the rest
Z95 = 1.959964
EVAL_METRICS = [
    ("pass@1", ("pass@1",)),
    ("avg@k", ("avg@k",)),
    ("format rate", ("format",)),
    ("reward", ("reward",)),
    ("tool calls per episode", ("tool_calls",)),
    ("invalid call rate", ("invalid_call_rate",)),
    ("turns", ("turns",)),
]


@dataclass
class Run:
    name: str
    train: list[dict] = field(default_factory=list)   # records with a step, in file order
    evals: list[dict] = field(default_factory=list)   # kind: metrics, whole benchmark


@dataclass
class Panel:
    title: str
    xlabel: str
    series: list[tuple[str, list, list]]               # (legend name, xs, ys)
    categories: list[str] | None = None                # eval panels by label: x is a label index
    legend: bool = False                               # several runs: name even a lone line
    section: str = "train"                             # "train" or "eval"
    rate: bool = False                                 # a share: drawn on a 0–1 axis
    intervals: list | None = None                      # per series: [(lo, hi)…] 95% intervals, or None
    note: str = ""                                     # what the reader must know (points off scale)
    bound: float = MAX_SHOWN                           # values beyond ±bound are drawn at the edge
    off_scale: int = 0                                 # how many values are beyond it


def _field(rec: dict, name: str):
    v = rec
    for part in name.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _first(rec: dict, names) -> float | None:
    for n in names:
        v = _field(rec, n)
        if v is not None:
            return v
    return None


def load_runs(paths: list[str], *, skip_bad: bool = False) -> list[Run]:
    """One Run per file (named by its stem, made unique), records sorted into train/eval."""
    from mars_cli.jsonl import read_located

    runs: list[Run] = []
    names: set[str] = set()
    for p in paths:
        stem = Path(p).stem if p != "-" else "stdin"
        name, i = stem, 2
        while name in names:
            name, i = f"{stem}-{i}", i + 1
        names.add(name)
        run = Run(name)
        for _, rec in read_located([p] if p != "-" else None, skip_bad=skip_bad):  # "-" is stdin
            kind = rec.get("kind")
            if kind == "metrics":
                if rec.get("by") is None and isinstance(rec.get("benchmark"), str):
                    run.evals.append(rec)
            elif kind in ("update", "sft") or _field(rec, "step") is not None:
                if _field(rec, "step") is None and _field(rec, "steps") is not None:
                    rec = {**rec, "step": rec["steps"]}  # sft epoch records count steps
                if kind == "sft" and _field(rec, "seconds") is not None:
                    rec = {**rec, "step_seconds": _per_step(rec, run.train)}  # sft: seconds per epoch
                if _field(rec, "step") is not None:
                    _append_step(run.train, rec)
        runs.append(run)
    if not any(r.train or r.evals for r in runs):
        raise MarsError("no metrics records to plot (update/sft records with a step, or eval records with kind: metrics)")
    return runs


def _append_step(train: list[dict], rec: dict) -> None:
    """Add a training record; one whose step is not past its kind's last (a restarted run's
    log appended to the first: `update --follow` resumed from an earlier save, or a step's
    record printed again on resume, marked `recovered`) replaces that kind's records from its
    step on, so each step has one point and the line follows the weights that were kept."""
    kind, step = rec.get("kind"), _field(rec, "step")
    same = [r for r in train if r.get("kind") == kind]
    if same and _field(same[-1], "step") is not None and step <= _field(same[-1], "step"):
        train[:] = [r for r in train if r.get("kind") != kind or _field(r, "step") < step]
    train.append(rec)


def _per_step(rec: dict, earlier: list[dict]) -> float | None:
    """An sft epoch record's seconds over the steps of that epoch (`steps` counts from the start)."""
    prev = next((_field(r, "step") for r in reversed(earlier) if r.get("kind") == "sft"), 0.0) or 0.0
    n = _field(rec, "step") - prev if _field(rec, "step") is not None else 0
    return _field(rec, "seconds") / n if n > 0 else None


_STEP_LABEL = re.compile(r"(?:^|[-_/:@])(?:step)?[-_]?(\d+)$", re.IGNORECASE)


def eval_step(rec: dict) -> float | None:
    """The training step an eval record names: its `step`, or a label ending in a number (rl-16)."""
    if _field(rec, "step") is not None:
        return _field(rec, "step")
    m = _STEP_LABEL.search(str(rec.get("label") or ""))
    return float(m.group(1)) if m else None


def wilson(p: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a share p over n trials."""
    d = 1 + Z95 ** 2 / n
    mid = (p + Z95 ** 2 / (2 * n)) / d
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def panels(runs: list[Run]) -> list[Panel]:
    """The panels that have at least one point, training first, then eval."""
    out = _train_panels(runs) + _eval_panels(runs)
    for p in out:
        _mark_off_scale(p)
    return out


def _train_panels(runs: list[Run]) -> list[Panel]:
    out = []
    for title, names in TRAIN_METRICS:
        series = []
        for run in runs:
            pts = [(_field(r, "step"), _first(r, names)) for r in run.train]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                series.append((run.name, [x for x, _ in pts], [y for _, y in pts]))
        if series:
            out.append(Panel(title, "step", series, legend=len(runs) > 1, rate=title in RATES))
    return out


def _eval_panels(runs: list[Run]) -> list[Panel]:
    out = []
    by_step = all(eval_step(r) is not None for run in runs for r in run.evals)
    labels: list[str] = []
    for run in runs:
        for r in run.evals:
            lab = str(r.get("label") if r.get("label") is not None else run.name)
            if lab not in labels:
                labels.append(lab)
    for title, names in EVAL_METRICS:
        series, intervals = [], []
        for run in runs:
            benches = list(dict.fromkeys(r["benchmark"] for r in run.evals))
            for b in benches:
                pts = [(eval_step(r) if by_step else labels.index(str(r.get("label") if r.get("label") is not None
                                                                       else run.name)), _first(r, names), r)
                       for r in run.evals if r["benchmark"] == b]
                pts = [(x, y, r) for x, y, r in pts if y is not None]
                if not pts:
                    continue
                legend = b if len(runs) == 1 else f"{run.name}: {b}"
                ns = [r.get("judged") for _, _, r in pts]
                if title == "pass@1" and all(isinstance(n, int) and n > 0 for n in ns):
                    legend += f" (n={ns[0]})" if len(set(ns)) == 1 else f" (n={min(ns)}–{max(ns)})"
                    intervals.append([wilson(min(1.0, max(0.0, y)), n) for (_, y, _), n in zip(pts, ns)])
                else:
                    intervals.append(None)
                series.append((legend, [x for x, _, _ in pts], [y for _, y, _ in pts]))
        if series:
            out.append(Panel(f"eval {title}", "training step" if by_step else "checkpoint", series,
                             categories=None if by_step else labels, section="eval", rate=title in RATES, legend=True,
                             intervals=intervals if any(intervals) else None,
                             note="95% interval over n judged samples" if any(intervals) else ""))
    return out


def _mark_off_scale(p: Panel) -> None:
    """Name the values too large to draw beside the rest (see the module docstring)."""
    ys = [abs(y) for _, _, s in p.series for y in s]
    bound = min(MAX_SHOWN, OFF_SCALE * max(1.0, statistics.median(ys)))
    off = [y for _, _, s in p.series for y in s if abs(y) > bound]
    p.off_scale = len(off)
    if off:
        worst = max(off, key=abs)
        p.note = "; ".join(x for x in (p.note, f"{len(off)} off scale (up to {worst:.3g}), drawn at the edge") if x)
    p.bound = bound


def _draw(ax, panel: Panel) -> None:
    ys_all = [y for _, _, s in panel.series for y in s]
    shown = [y for y in ys_all if abs(y) <= panel.bound] or [0.0]
    # off-scale values stand just beyond the others, on their side of zero
    top, bottom = max(max(shown), 0.0), min(min(shown), 0.0)
    pad = 0.1 * ((top - bottom) or 1.0)
    for i, (name, xs, ys) in enumerate(panel.series):
        drawn = [y if abs(y) <= panel.bound else (top + pad if y > 0 else bottom - pad) for y in ys]
        # the line breaks at an off-scale point: its edge position is no value to connect
        line, = ax.plot(xs, [d if abs(y) <= panel.bound else math.nan for y, d in zip(ys, drawn)],
                        marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.4, label=name)
        if panel.intervals and panel.intervals[i]:
            lo = [max(0.0, y - a) for y, (a, _) in zip(drawn, panel.intervals[i])]  # rounding aside, a <= y <= b
            hi = [max(0.0, b - y) for y, (_, b) in zip(drawn, panel.intervals[i])]
            ax.errorbar(xs, drawn, yerr=[lo, hi], fmt="none", ecolor=line.get_color(), alpha=0.5, capsize=2)
        for x, y, d in zip(xs, ys, drawn):
            if abs(y) > panel.bound:
                ax.plot([x], [d], linestyle="none", color="red", markersize=7, marker="^" if y > 0 else "v")
    if panel.rate and all(-1e-9 <= y <= 1 + 1e-9 for y in ys_all):
        ax.set_ylim(-0.03, 1.03)
    elif len(shown) < len(ys_all):
        ax.set_ylim(bottom - 1.5 * pad, top + 1.5 * pad)
    ax.set_title(panel.title + (f"\n{panel.note}" if panel.note else ""), fontsize=9 if panel.note else 10)
    ax.set_xlabel(panel.xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if panel.categories is not None:
        ax.set_xticks(range(len(panel.categories)))
        ax.set_xticklabels(panel.categories, rotation=20, ha="right")
        ax.set_xlim(-0.5, len(panel.categories) - 0.5)
    if len(panel.series) > 1 or panel.categories is not None or panel.legend:
        ax.legend(fontsize=7)


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    # Reproducible SVG: no random ids or dates in the output.
    matplotlib.rcParams["svg.hashsalt"] = "mars"
    matplotlib.rcParams["svg.fonttype"] = "none"
    import matplotlib.pyplot as plt

    return plt


def render_png(ps: list[Panel], dest, *, dpi: int = 110) -> None:
    plt = _pyplot()
    cols = min(3, len(ps))
    rows = math.ceil(len(ps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, p in zip(axes.flat, ps):
        _draw(ax, p)
    for ax in list(axes.flat)[len(ps):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(dest, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)


def _svg(panel: Panel) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    _draw(ax, panel)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.5em}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:4px;background:#fff}
figure svg{width:420px;height:auto;display:block}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}"""


def _summary(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        last = run.train[-1] if run.train else {}
        rows.append("<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            html.escape(run.name), len(run.train), "-" if not last else f"{_field(last, 'step'):g}",
            len({(r['benchmark'], str(r.get('label'))) for r in run.evals})))
    return ("<table><tr><th>run</th><th>training records</th><th>last step</th><th>eval points</th></tr>"
            + "".join(rows) + "</table>")


def render_html(runs: list[Run], ps: list[Panel], *, title: str = "mars runs") -> str:
    sections = []
    for heading, group in (("Training", [p for p in ps if p.section == "train"]),
                           ("Evaluation", [p for p in ps if p.section == "eval"])):
        if group:
            figs = "".join(f'<figure data-panel="{html.escape(p.title)}">{_svg(p)}</figure>' for p in group)
            sections.append(f"<h2>{heading}</h2><div class=\"grid\">{figs}</div>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{_summary(runs)}"
            + "".join(sections) + "</body></html>\n")


def write_plot(runs: list[Run], out: str | os.PathLike, *, title: str | None = None) -> list[Panel]:
    """Draw the runs to `out` (.html/.htm or .png, written atomically); return the panels."""
    from mars_cli.fsutil import atomic_file

    suffix = Path(out).suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise MarsError(f"{out}: unknown output type {suffix or '(none)'!r} (use .html or .png)")
    ps = panels(runs)
    if not ps:
        raise MarsError("the records carry none of the plotted metrics")
    title = title or "mars: " + ", ".join(r.name for r in runs)
    if suffix == ".png":
        buf = io.BytesIO()
        render_png(ps, buf)
        data = buf.getvalue()
    else:
        data = render_html(runs, ps, title=title).encode()
    with atomic_file(out) as tmp:
        tmp.write_bytes(data)
    return ps
