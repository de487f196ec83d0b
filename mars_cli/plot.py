"""Training and eval curves from metrics records: one page (HTML, inline SVG) or one PNG.

    runs = load_runs(["sft.jsonl", "rl.jsonl", "eval.jsonl"])   # each file is one run
    write_plot(runs, "run.html")

What is drawn:
- training records (`kind` update or sft, or any record with a numeric `step`): each metric
  in TRAIN_METRICS against `step`, one line per run, runs overlaid in one panel;
- eval records (`kind: metrics`, the whole-benchmark row, not a --by subset): each metric in
  EVAL_METRICS per benchmark, one line per (run, benchmark), points by `label` in file order
  (the checkpoints in the order they were evaluated).
A metric a run does not carry is left out, a record without it is skipped, and a panel
with no point at all is not drawn. Nested fields are read by dotted name
(`logprob_gap.mean_abs`). matplotlib draws both formats (Agg backend, no display).
"""

from __future__ import annotations

import html
import io
import math
import os
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
    ("step time (s)", ("seconds", "step_seconds")),
]
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
    categories: list[str] | None = None                # eval panels: x is a label index
    legend: bool = False                               # several runs: name even a lone line


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
                if _field(rec, "step") is not None:
                    run.train.append(rec)
        runs.append(run)
    if not any(r.train or r.evals for r in runs):
        raise MarsError("no metrics records to plot (update/sft records with a step, or eval records with kind: metrics)")
    return runs


def panels(runs: list[Run]) -> list[Panel]:
    """The panels that have at least one point, training first, then eval."""
    out = []
    for title, names in TRAIN_METRICS:
        series = []
        for run in runs:
            pts = [(_field(r, "step"), _first(r, names)) for r in run.train]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                series.append((run.name, [x for x, _ in pts], [y for _, y in pts]))
        if series:
            out.append(Panel(title, "step", series, legend=len(runs) > 1))
    labels: list[str] = []
    for run in runs:
        for r in run.evals:
            lab = str(r.get("label") if r.get("label") is not None else run.name)
            if lab not in labels:
                labels.append(lab)
    for title, names in EVAL_METRICS:
        series = []
        for run in runs:
            benches = list(dict.fromkeys(r["benchmark"] for r in run.evals))
            for b in benches:
                pts = [(labels.index(str(r.get("label") if r.get("label") is not None else run.name)), _first(r, names))
                       for r in run.evals if r["benchmark"] == b]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    legend = b if len(runs) == 1 else f"{run.name}: {b}"
                    series.append((legend, [x for x, _ in pts], [y for _, y in pts]))
        if series:
            out.append(Panel(f"eval {title}", "checkpoint", series, categories=labels))
    return out


def _draw(ax, panel: Panel) -> None:
    for name, xs, ys in panel.series:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.4, label=name)
    ax.set_title(panel.title, fontsize=10)
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
    for heading, group in (("Training", [p for p in ps if p.categories is None]),
                           ("Evaluation", [p for p in ps if p.categories is not None])):
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
