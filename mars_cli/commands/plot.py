"""`mars plot METRICS.jsonl… -o run.html|run.png`: training and eval curves."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def main(
    files: Optional[List[Path]] = typer.Argument(None, help="Metrics files (JSONL), one run each [default: stdin]."),
    out: Path = typer.Option(..., "--out", "-o", help="The page (.html) or image (.png) to write."),
    title: Optional[str] = typer.Option(None, "--title", help="Page title [default: the run names]."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable lines with a warning instead of failing."),
) -> None:
    """Draw training and eval curves; several files overlay runs.

    Reads the records `mars update` and `mars sft` print (x = step) and `mars eval`'s
    (kind: metrics; one line per benchmark, points by --label in file order). Panels:
    reward, accuracy, format rate, tool calls per episode, loss, grad norm, KL, clip
    fraction, staleness, step time (seconds per step, SFT too); eval pass@1 (with n and a 95%
    interval), format, tool calls… per benchmark, at the training step a label names (rl-16)
    or else by label. Rates run on a 0–1 axis. A value far off the panel's scale (a diverged
    loss) is drawn at the edge and named on stderr. A metric no record carries is left out.
    The HTML page is self-contained (inline SVG, no script, works offline). Prints one
    summary record.

    Example: mars update … >> rl.jsonl; mars eval … -l step-4 >> rl.jsonl; mars plot rl.jsonl -o rl.html
    """
    from mars_cli.jsonl import RecordWriter
    from mars_cli.plot import load_runs, write_plot
    from mars_cli.streams import warn

    runs = load_runs([str(f) for f in files] if files else ["-"], skip_bad=skip_bad)
    ps = write_plot(runs, out, title=title)
    for p in ps:
        if p.off_scale:
            warn(f"{p.title}: {p.note}")
    warn(f"wrote {len(ps)} panels to {out}")
    with RecordWriter() as w:
        w.write({"out": str(out), "runs": [r.name for r in runs], "panels": [p.title for p in ps],
                 "points": sum(len(xs) for p in ps for _, xs, _ in p.series)})
