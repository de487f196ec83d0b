"""`mars eval`: judged trajectories in, one metrics record per benchmark out."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def main(
    files: Optional[List[Path]] = typer.Argument(None, help="Judged trajectory files (JSONL) [default: stdin]."),
    by: Optional[List[str]] = typer.Option(None, "--by", help="Also per subset of this task or meta field (category, difficulty); repeatable."),
    label: Optional[str] = typer.Option(None, "--label", "-l", envvar="MARS_EVAL_LABEL", help="Tag every record with this name (e.g. after-sft)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the records to this file instead of stdout."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable lines with a warning instead of failing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table on stderr."),
    report_to: str = typer.Option("none", "--report-to", envvar="MARS_REPORT_TO", help="Also log metrics to tensorboard or wandb (none: only the records)."),
    logging_dir: Optional[Path] = typer.Option(None, "--logging-dir", envvar="MARS_LOGGING_DIR", help="Where --report-to writes [default: ./runs/CMD-TIME/]."),
    step: Optional[int] = typer.Option(None, "--step", min=0, help="The training step of the evaluated checkpoint (x axis for --report-to) [default: 0]."),
) -> None:
    """Score judged trajectories: Pass@1, Avg@k, Pass@k, tool use.

    One record per benchmark (and per --by subset): pass@1 (mean accuracy over samples),
    with k samples per task avg@k and unbiased pass@k, missing (samples without an
    accuracy, left out, not counted wrong), format rate, tool calls per episode and per
    tool, invalid call rate, turns, finish reasons, tokens. A table goes to stderr.
    """
    import sys

    from mars_cli.eval.metrics import compute_metrics, format_table
    from mars_cli.jsonl import RecordWriter, read_located
    from mars_cli.tracking import open_tracker, run_settings

    items = read_located([str(f) for f in files or []], skip_bad=skip_bad)
    with open_tracker(report_to, logging_dir=logging_dir, command="eval", config=run_settings()) as t:
        records = compute_metrics(items, by=list(by or []), label=label)
        with RecordWriter(out) as w:
            for r in records:
                w.write(r)
        for r in records:
            sub = "" if r.get("by") is None else f"{r['by']}={r['subset']}/"
            t.log(r, step=step, prefix=f"eval/{r['benchmark']}/{sub}")
    if not quiet and records:
        sys.stderr.write(format_table(records) + "\n")
