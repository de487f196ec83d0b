"""`mars data`: benchmark files → task records, and the offline synthetic benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mars_cli.flags import renamed

app = typer.Typer(
    help="Convert published benchmarks to task records; make the synthetic benchmark.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("convert")
def convert(
    inputs: List[str] = typer.Argument(..., help="Benchmark files (parquet or .pq, jsonl, json, tsv) or folders."),
    fmt: str = typer.Option("auto", "--format", "-f", help="auto (from the first file's columns), hr-mmsearch, mmsearch, fvqa, sensenova-mars, vstar, hr-bench or mme-realworld."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: tasks.jsonl and images/ (replaced atomically)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the option shuffle (V*, whose source lists the answer first)."),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="Resolve relative image paths here [default: beside each input]."),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", help="Override the benchmark name of every task."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Stop after this many tasks."),
) -> None:
    """Convert benchmark files into task records.

    Writes OUT/tasks.jsonl and OUT/images/ (each image once, named by content hash) and
    prints one summary record. Image paths in the tasks are absolute, so they run from
    any directory. Rows are streamed; an error names the file and row.

    --format auto tells the format from the first file's columns and stops when it cannot.
    A --format that reads a row but not all of its gold-answer columns (FVQA's candidate
    answers under sensenova-mars, MMSearch's alternative answers) is refused: the answers
    it drops would change scores.
    """
    from mars_cli.errors import UsageError
    from mars_cli.eval.convert import convert as run
    from mars_cli.eval.formats import FORMATS
    from mars_cli.jsonl import RecordWriter
    from mars_cli.streams import progress
    from mars_cli.streams import summary as summary_line

    if fmt != "auto" and fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; choose one of: auto, {', '.join(FORMATS)}")
    from mars_cli.hub import is_hub_id, resolve_dataset

    inputs = [str(resolve_dataset(i)) if is_hub_id(i) else i for i in inputs]  # ORG/NAME: the cached dataset
    bar = progress(desc="converting", unit=" tasks", summary=False)  # the "wrote" line sums up
    summary = run(fmt, inputs, out, seed=seed, image_root=image_root, benchmark=benchmark, limit=limit, on_task=lambda _: bar.update())
    bar.close()
    summary_line(f"wrote {summary['tasks']} {summary['format']} tasks and {summary['images']} images to {summary['out']}")
    with RecordWriter() as w:
        w.write(summary)


@app.command("fetch")
def fetch(
    names: List[str] = typer.Argument(..., help="Benchmarks by --format name (vstar, hr-bench, …) or Hub dataset names ORG/NAME."),
) -> None:
    """Download benchmarks into the Hugging Face cache (needs the network).

    Known names: hr-mmsearch, sensenova-mars, mmsearch, fvqa, vstar, hr-bench,
    mme-realworld. An already cached copy is used as it is; HF_HUB_OFFLINE=1 refuses to
    download. Prints one record per name {name, repo, path}; convert with
    `mars data convert PATH -f FORMAT -o DIR` (or give the ORG/NAME to convert directly).
    Gated datasets take the token from HF_TOKEN.
    """
    from mars_cli.hub import fetch_dataset
    from mars_cli.jsonl import RecordWriter
    from mars_cli.streams import warn

    with RecordWriter() as w:
        for name in names:
            repo, path = fetch_dataset(name)
            warn(f"{name}: {repo} at {path}")
            w.write({"name": name, "repo": repo, "path": str(path)})


@app.command("synth")
@renamed({"--n": "--tasks", "-n": "--tasks"})
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (replaced atomically)."),
    n: int = typer.Option(64, "--tasks", min=1, help="Number of tasks."),
    seed: int = typer.Option(0, "--seed", help="Everything follows from the seed: same seed, same files."),
    test_fraction: float = typer.Option(0.0, "--test-fraction", min=0.0, max=0.99, help="Also write train/ and test/ splits, this share in test."),
    val_fraction: float = typer.Option(0.0, "--val-fraction", min=0.0, max=0.99,
                                       help="Also write val/: this share of the tasks, for choosing settings (the test split stays the same)."),
    distractors: int = typer.Option(2, "--distractors", min=0, help="Extra unrelated corpus passages per task."),
    box_grid: int = typer.Option(50, "--box-grid", min=1, max=1000,
                                 help="Reference zoom boxes snap outward to multiples of this (0-1000 units): "
                                      "coarser boxes are fewer distinct numbers for a small policy to learn."),
    kinds: Optional[str] = typer.Option(None, "--kinds",
                                        help="Task kinds and their weights, KIND=W,… in rotation order: crop+search, perception, "
                                             "search (e.g. search=3,crop+search=1) [default: crop+search=3,perception=1,search=1]."),
    protocol: Optional[str] = typer.Option(None, "--protocol", envvar="MARS_PROTOCOL",
                                           help="Protocol profile the reference trajectories are written in: sensenova | mars "
                                                "(use the one rollout will use) [default: sensenova]."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", envvar="MARS_SYSTEM_PROMPT",
                                                help="The reference trajectories' system prompt text, as `mars rollout "
                                                     "--system-prompt` (use the one rollout will use)."),
    search_k: Optional[int] = typer.Option(None, "--search-k", min=1,
                                           help="Run the reference searches on a local index of the corpus, top K, as "
                                                "`mars rollout --search-k K` will [default: the gold passage, then its namesake]."),
    vague_fraction: float = typer.Option(0.0, "--vague-fraction", min=0.0, max=1.0,
                                         help="This share of the references (with --search-k) search for the place's kind "
                                              "and place word instead of its name and answer from whatever they find: the "
                                              "cold start of a teacher that writes vague queries (the tasks stay the same)."),
    attributes: Optional[str] = typer.Option(None, "--attributes",
                                             help="The facts questions ask for, comma-separated: year, founder, city "
                                                  "[default: all three]."),
    names: str = typer.Option("made-up", "--names",
                              help="made-up: invented names | words: names, cities and founders from short word lists "
                                   "(at most 1710 tasks), which a small policy learns to copy far sooner."),
) -> None:
    """Make the offline synthetic high-resolution benchmark.

    4K scenes with a small named sign, a corpus of made-up facts about the names,
    questions that need a crop and a search (plus perception-only and search-only ones),
    and a reference trajectory per task. Writes OUT/tasks.jsonl, corpus.jsonl,
    reference.jsonl, images/, artifacts/ (and train/, test/ with --test-fraction).
    """
    from mars_cli.errors import MarsError, UsageError
    from mars_cli.eval.synth import NAMES, make_synth, parse_attributes, parse_kinds
    from mars_cli.jsonl import RecordWriter
    from mars_cli.protocol import get_profile
    from mars_cli.streams import summary as summary_line

    try:
        parse_kinds(kinds)
        parse_attributes(attributes)
    except MarsError as e:
        raise UsageError(str(e)) from None
    get_profile(protocol)  # a UsageError naming the profiles
    if names not in NAMES:
        raise UsageError(f"--names must be one of {', '.join(NAMES)}, got {names!r}")
    if test_fraction + val_fraction >= 1:
        raise UsageError(f"--test-fraction {test_fraction:g} and --val-fraction {val_fraction:g} leave no training tasks")

    summary = make_synth(out, n=n, seed=seed, test_fraction=test_fraction, distractors=distractors, box_grid=box_grid,
                         kinds=kinds, protocol=protocol, val_fraction=val_fraction, names=names,
                         system_prompt=system_prompt, search_k=search_k,
                         attributes=attributes, vague_fraction=vague_fraction)
    summary_line(f"wrote {summary['tasks']} tasks, {summary['passages']} passages and {summary['images']} images to {out}")
    with RecordWriter() as w:
        w.write(summary)
