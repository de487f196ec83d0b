"""`mars show TRAJ.jsonl -o page.html`: look at episodes in a browser."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mars_cli.flags import renamed


@renamed({"--base": "--image-root"})
def main(
    files: Optional[List[Path]] = typer.Argument(None, help="Trajectory files (JSONL), judged or not [default: stdin]."),
    out: Path = typer.Option(..., "--out", "-o", help="The HTML page to write."),
    embed: bool = typer.Option(False, "--embed", help="Inline downscaled images: one portable file (larger)."),
    title: str = typer.Option("mars episodes", "--title", help="Page title."),
    base: Optional[Path] = typer.Option(None, "--image-root", help="Resolve relative image paths from here [default: current directory]."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Show at most this many episodes."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable lines with a warning instead of failing."),
) -> None:
    """Write an HTML page of episodes: images, crop boxes, tools, rewards.

    A self-contained page (no server, no CDN): per episode the question, the image with
    every zoom box drawn on it, each turn's thinking, tool calls and results, the answer,
    gold and rewards, with filters by benchmark, outcome and text. Images are linked
    relative to the page (lazy-loaded) unless --embed. Prints one summary record.
    """
    from mars_cli.eval.show import build_page
    from mars_cli.jsonl import RecordWriter, read_located
    from mars_cli.streams import warn

    items = read_located([str(f) for f in files or []], skip_bad=skip_bad)
    summary = build_page(items, out, embed=embed, title=title, limit=limit, base=base)
    warn(f"wrote {summary['episodes']} episodes to {out}")
    with RecordWriter() as w:
        w.write(summary)
