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
    logging_dir: Optional[Path] = typer.Option(None, "--logging-dir", envvar="MARS_LOGGING_DIR", help="Where --report-to writes [default: under ./runs/, named by the command and the time]."),
    step: Optional[int] = typer.Option(None, "--step", min=0, help="The training step of the evaluated checkpoint: written into each metrics record (mars plot's x axis) and the x axis for --report-to [default: none; 0 for trackers]."),
) -> None:
    """Score judged trajectories: Pass@1, Avg@k, Pass@k, tool use.

    One record per benchmark (and per --by subset): pass@1 (mean accuracy over samples),
    with k samples per task avg@k and unbiased pass@k, missing (samples without an
    accuracy, left out, not counted wrong), errors (episodes that ended finish "error": a
    broken environment, not a wrong model), format rate, tool calls per episode and per
    tool, invalid call rate, turns, finish reasons, tokens. A table goes to stderr, then a
    warning for errors and unjudged records. The exit status is 1 when no record carries
    an accuracy (nothing was judged).
    """
    import sys

    from mars_cli.errors import MarsError
    from mars_cli.eval.metrics import compute_metrics, format_table, problems
    from mars_cli.jsonl import RecordWriter, read_located
    from mars_cli.progress import count_lines
    from mars_cli.streams import progress, warn
    from mars_cli.tracking import open_tracker, run_settings

    paths = [str(f) for f in files or []]
    items = progress(read_located(paths, skip_bad=skip_bad), desc="eval", unit="records", total=count_lines(paths),
                     summary=False, disable=quiet)  # the table is the summary
    with open_tracker(report_to, logging_dir=logging_dir, command="eval", config=run_settings()) as t:
        records = compute_metrics(items, by=list(by or []), label=label)
        if step is not None:
            records = [{**r, "step": step} for r in records]
        warnings, fatal = problems(records)
        if fatal:
            raise MarsError(fatal)  # before writing: a metrics file without a score is no result
        with RecordWriter(out) as w:
            for r in records:
                w.write(r)
        for r in records:
            sub = "" if r.get("by") is None else f"{r['by']}={r['subset']}/"
            t.log(r, step=step, prefix=f"eval/{r['benchmark']}/{sub}")
    if not quiet and records:
        sys.stderr.write(format_table(records) + "\n")
    for line in warnings:
        warn(line)
