"""`mars advantage`: group-relative advantages (BN-GSPO, GRPO, Dr.GRPO, RLOO)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mars_cli.flags import renamed


@renamed({"--output": "--out", "--batch-size": "--batch-groups"})
def main(
    ctx: typer.Context,
    files: Optional[List[Path]] = typer.Argument(None, help="Judged trajectory JSONL files [default: stdin]."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here (atomically) instead of stdout."),
    algo: str = typer.Option("bn-gspo", "--algo", envvar="MARS_ADVANTAGE_ALGO", help="bn-gspo, grpo, dr-grpo, rloo or grpo-batch-std."),
    ddof: int = typer.Option(1, "--ddof", min=0, help="Delta degrees of freedom of the group std (1: unbiased)."),
    eps: float = typer.Option(1e-6, "--eps", help="Added to the group std before dividing."),
    batch_norm: Optional[bool] = typer.Option(None, "--batch-norm/--no-batch-norm", help="The batch step [default: on for bn-gspo only]."),
    batch_ddof: int = typer.Option(0, "--batch-ddof", min=0, help="Delta degrees of freedom of the batch std (0: population)."),
    batch_eps: float = typer.Option(1e-9, "--batch-eps", help="Added to the batch std before dividing."),
    batch_groups: Optional[int] = typer.Option(None, "--batch-groups", min=1, help="One batch per N complete groups, written as it closes [default: the whole input is one batch]."),
    group_size: Optional[int] = typer.Option(None, "--group-size", min=1, help="Records per group (rollout's -n): a batch then closes on its last record, not on the next group's first."),
    drop_constant: bool = typer.Option(False, "--drop-constant-groups", help="Drop groups whose rewards are all equal (dynamic sampling)."),
    strict: bool = typer.Option(False, "--strict", help="A null reward is an error, not a dropped group."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable lines with a warning."),
    preset: Optional[str] = typer.Option(None, "--preset", help="official-script: the released training script's GRPO (no batch normalization); explicit flags win."),
) -> None:
    """Add advantages to judged trajectories, group by group.

    Trajectories are grouped by their `group` field (groups need not be contiguous). grpo: A = (r − mean_g)/(std_g + eps), std with --ddof (unbiased by default), a group of equal rewards gets 0. bn-gspo (the default, SenseNova-MARS): grpo, then A ← (A − mean_B)/(std_B + batch_eps) over all trajectories of the scope, population std. dr-grpo: A = r − mean_g. rloo: A = r − mean of the other rewards of the group. grpo-batch-std: A = (r − mean_g)/(std of all rewards + eps) (TRL's scale_rewards="batch"; TRL's default is grpo --eps 1e-4, verl's is grpo).

    The batch statistics need the whole batch, so the command BUFFERS it before writing anything: the whole input by default (groups in any order), or one batch of --batch-groups N groups (one training step's prompts). Batches stream one after another while the records of each group are contiguous (`rollout --group-order`); a group that comes back after its batch was written is an error. A group is complete when the next one starts, or with --group-size K once it holds K records.

    A group with a null reward is dropped with a warning (--strict: an error). When every advantage comes out 0 (each group's rewards are equal) the batch is degenerate: a warning says so, and the records are still written. Each record gets `advantage`, `advantage_stats` {algo, group_mean, group_std, group_size, batch_mean, batch_std, ddof, eps, scope, scope_size} and `batch` {id, size}: the batch's record count and a hash of its content (group, sample and reward of each record, and the settings), so the same input gives the same output byte for byte and `mars update --follow` steps as soon as a batch's last record arrives.
    """

    from mars_cli.errors import UsageError
    from mars_cli.jsonl import RecordWriter, SkipCounter, read_located
    from mars_cli.rl.advantage import ESTIMATORS, FIELDS, AdvantageConfig, AdvantageStats, advantage_records

    from mars_cli import presets

    v = presets.apply(ctx, dict(algo=algo, batch_norm=batch_norm, ddof=ddof, eps=eps), presets.training(preset, "advantage"))
    algo, batch_norm, ddof, eps = v["algo"], v["batch_norm"], v["ddof"], v["eps"]
    if algo not in ESTIMATORS:
        raise UsageError(f"--algo must be one of {', '.join(ESTIMATORS)}, got {algo!r}")
    cfg = AdvantageConfig(algo=algo, ddof=ddof, eps=eps, batch_norm=batch_norm, batch_ddof=batch_ddof, batch_eps=batch_eps)
    stats, skipped = AdvantageStats(), SkipCounter()
    from mars_cli import streams

    def _summary(end: str = "") -> None:
        streams.summary(f"{stats.written} of {stats.records} records written in {stats.batches} batch(es); dropped "
                        f"groups: {stats.dropped_null} with a null reward, {stats.dropped_constant} constant{end}")

    if output is None:
        from mars_cli.pipes import exit_when_reader_gone

        # `update --follow --max-steps` ends the pipeline while this waits for input
        exit_when_reader_gone(lambda: _summary("; its reader went away"))
    from mars_cli.progress import counting

    # periodic lines while it waits for its input; the summary line below ends the run
    bar = streams.progress(desc="advantage", unit="records", per_input=True, summary=False)
    located = counting(read_located(files, skip_bad=skip_bad, skipped=skipped, with_text=True), bar)
    signal = set()  # groups whose advantages are not all 0
    with RecordWriter(output) as w, bar:
        for rec, text in advantage_records(located, cfg, batch_groups=batch_groups, group_size=group_size, drop_constant=drop_constant, strict=strict, stats=stats):
            if text is None:
                w.write(rec, fresh=FIELDS)
            else:
                w.write_extended(text, {k: rec[k] for k in FIELDS})
            if rec["advantage"] != 0:
                signal.add(rec["group"])
    skipped.report()
    if stats.written and not signal:
        from mars_cli.streams import warn

        warn(f"all {stats.written} advantages are 0: every group's rewards are equal, so an update on this batch "
             "learns nothing from it (sample more per task with -n, or check the judge)")
    _summary()
