"""`mars judge`: score trajectories — accuracy, format reward, their weighted sum."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import List, Optional

import typer

from mars_cli.flags import renamed


@renamed({"--output": "--out", "--concurrency": "--max-inflight"})
def main(
    files: Optional[List[Path]] = typer.Argument(None, help="Trajectory JSONL files [default: stdin]."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here (atomically) instead of stdout."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Override every record's scorer: em, substring, f1, mcq, llm, simpleqa."),
    format_weight: float = typer.Option(0.5, "--format-weight", envvar="MARS_FORMAT_WEIGHT", help="w in reward = accuracy + w·format − tool cost."),
    tool_cost: float = typer.Option(0.0, "--tool-cost", help="Subtract this per tool call (recorded as rewards.tool_cost)."),
    base_url: Optional[str] = typer.Option(None, "--judge-base-url", envvar="MARS_JUDGE_BASE_URL", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 [default: none: rule judge]."),
    model: Optional[str] = typer.Option(None, "--judge-model", envvar="MARS_JUDGE_MODEL", help="Judge model name (needed with an endpoint)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", envvar="MARS_PROTOCOL", help="Score by this profile's rules [default: each record's protocol]: sensenova-eval scores as the official eval.py."),
    rubric: str = typer.Option("sensenova", "--rubric", help="LLM rubric for llm-scored records: sensenova (the official lenient 13-rule Yes/No, image sent, one call per gold) or strict (mars's yes/no over all golds)."),
    judge_image: Optional[bool] = typer.Option(None, "--judge-image/--no-judge-image", help="Send the question's first image to the judge [default: on for sensenova, off for strict]."),
    min_judge_success: float = typer.Option(0.95, "--min-judge-success", help="Judge health: fail when a smaller share of LLM judge requests succeeded (with an endpoint only)."),
    concurrency: int = typer.Option(32, "--max-inflight", min=1, envvar="MARS_JUDGE_CONCURRENCY", help="Judge requests in flight."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds per judge request."),
    retries: int = typer.Option(3, "--retries", min=0, help="Retries of a failed request (exponential backoff)."),
    cache: Optional[Path] = typer.Option(None, "--cache", envvar="MARS_CACHE", help="Cache verdicts in DIR/judge.sqlite [default: off]."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0 even when some records could not be judged."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable lines with a warning."),
) -> None:
    """Add rewards to trajectories: accuracy, format and their sum.

    Accuracy comes from each record's `scorer` (or --scorer): em and substring after SQuAD normalization, f1 (SQuAD token F1, max over golds), mcq (option letter cascade, or the option's text), llm / simpleqa (an LLM judge over an OpenAI-compatible API; key from MARS_JUDGE_API_KEY or OPENAI_API_KEY; an exact match skips the call). With several golds any one counts.

    Without --judge-base-url (the offline default) llm-scored records are scored by the official exact-match rule (eval.py's em_check: SQuAD normalization on ASCII rules), never a more lenient one; judge.method then says "rule-fallback:em".

    --protocol sensenova-eval (or records written with it) scores as the official inference/eval.py: mcq by its A–D cascade on the final reply, llm on the final reply's answer tag or, untagged, the whole reply, exact match without Unicode folding, judge calls with max_tokens 8192, and a judge call that fails after its retries stops the command (exit 1, nothing written).

    The default rubric is the official SenseNova-MARS judge: a lenient 13-rule Yes/No rubric that sees the image, asked once per gold (the first Yes wins); a reply counts as Yes only with the tag `<judge>Yes</judge>` (a bare "Yes" counts as No, as the official judge scores it), and a request that fails after its retries scores 0. Judge health: when fewer than --min-judge-success of the LLM requests succeeded, the command fails (exit 1, nothing written with -o), as the official runs do.

    Format is 1 when the episode ended in a non-empty answer and every tool call was valid; calls that failed for the infrastructure's sake (`infra` in tool_calls: backend errors, replay misses, no stored image results) do not count against it. An episode that ended on a malformed turn (finish "malformed") gets reward 0. reward = accuracy + w·format − tool_cost. A record the judge could not score gets accuracy and reward null with judge.error, and the exit status is 1 unless --allow-missing. Output keeps the input order; re-judging replaces only rewards, reward and judge.
    """
    from mars_cli import streams
    from mars_cli.errors import MarsError, UsageError
    from mars_cli.jsonl import RecordWriter, SkipCounter, read_located
    from mars_cli.progress import count_lines, duration
    from mars_cli.records import SCORERS
    from mars_cli.rl.judge import FIELDS, JudgeConfig, JudgeStats, check_health, judge_records
    from mars_cli.rl.llm_judge import rubric_name

    if protocol is not None:
        from mars_cli.protocol import get_profile

        get_profile(protocol)
    if scorer is not None and scorer not in SCORERS:
        raise UsageError(f"--scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    rubric = rubric_name(rubric)
    if rubric not in ("sensenova", "strict", "simpleqa"):
        raise UsageError(f"--rubric must be sensenova or strict, got {rubric!r}")
    if not 0.0 <= min_judge_success <= 1.0:
        raise UsageError(f"--min-judge-success must be between 0 and 1, got {min_judge_success}")
    if not (math.isfinite(format_weight) and math.isfinite(tool_cost)):
        raise UsageError("--format-weight and --tool-cost must be finite numbers")
    api_key = os.environ.get("MARS_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    cfg = JudgeConfig(scorer=scorer, format_weight=format_weight, tool_cost=tool_cost, base_url=base_url or None,
                      model=model, api_key=api_key, rubric=rubric, protocol=protocol, judge_image=judge_image, min_success=min_judge_success,
                      concurrency=concurrency,
                      timeout=timeout, retries=retries, cache_dir=str(cache) if cache else None)
    stats, skipped = JudgeStats(), SkipCounter()
    written, t0 = [], time.perf_counter()
    if output is None:
        from mars_cli.pipes import exit_when_reader_gone

        # a reader that is gone ends this stage even while it waits for input, with its summary
        exit_when_reader_gone(lambda: streams.summary(
            f"{written[0].count if written else 0} records in {duration(time.perf_counter() - t0)}; its reader went away"))
    located = read_located(files, skip_bad=skip_bad, skipped=skipped)
    with RecordWriter(output) as w:
        written.append(w)
        for rec in streams.progress(judge_records(located, cfg, stats), desc="judge", unit="records", total=count_lines(files),
                                   per_input=True):
            w.write(rec, fresh=FIELDS)
        check_health(stats, cfg)  # inside the writer: a failed check leaves no -o file behind
    skipped.report()
    logging.getLogger("mars.judge").info(stats.summary())
    if stats.missing and not allow_missing:
        raise MarsError(f"{stats.missing} record(s) could not be judged (first: {stats.first_error}; see judge.error); "
                        "--allow-missing accepts that")
