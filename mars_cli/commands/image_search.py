"""`mars image-search`: reverse image search from the shell, the agent's tool code."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mars_cli.flags import renamed


@renamed({"--output": "--out", "--top-k": "--num-results", "--model": "--image-model", "--index": "--image-index"})
def main(
    images: Optional[List[str]] = typer.Argument(None, help="Image paths (or URLs for serper) (default: records with 'image' or 'images' on stdin)."),
    backend: str = typer.Option("local", "--backend", "-b", envvar="MARS_IMAGE_SEARCH_BACKEND", help="local, precomputed or serper."),
    index: Optional[Path] = typer.Option(None, "--image-index", envvar="MARS_IMAGE_INDEX", help="Index directory for the local backend."),
    model: Optional[Path] = typer.Option(None, "--image-model", envvar="MARS_IMAGE_MODEL", help="The CLIP-style model the index was built with, if any."),
    k: int = typer.Option(5, "-k", "--num-results", min=1, max=20, help="Number of results per image."),
    group: bool = typer.Option(False, "--group", help="One record per image (results, rendered context, thumbnails)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="precomputed: base of relative thumbnail paths (default: the task's data_dir, else .)."),
    serper_url: Optional[str] = typer.Option(None, "--serper-url", envvar="MARS_SERPER_URL", help="serper.dev base URL (key from SERPER_API_KEY)."),
    artifacts: Optional[Path] = typer.Option(None, "--artifacts", envvar="MARS_ARTIFACTS", help="serper: where downloaded thumbnails go (default: artifacts)."),
    cache: Optional[Path] = typer.Option(None, "--cache", envvar="MARS_CACHE", help="Record/replay cache directory."),
    replay: bool = typer.Option(False, "--replay", help="Answer from the cache only; a miss is an error."),
    rate_limit: Optional[float] = typer.Option(None, "--rate-limit", min=0.001, help="At most N API calls per second."),
    timeout: float = typer.Option(20.0, "--timeout", min=0.01, help="Seconds per HTTP request."),
    retries: int = typer.Option(3, "--retries", min=0, help="Retries on timeouts, 429 and 5xx."),
    backoff: float = typer.Option(0.5, "--backoff", min=0.0, help="Seconds before the first retry (doubled each time)."),
    allow_private: bool = typer.Option(False, "--allow-private", help="Allow fetching thumbnails on private/loopback addresses."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here (atomically) instead of stdout."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable input lines with a warning."),
) -> None:
    """Find images like IMG: titles and thumbnails.

    Prints one record per result {image, rank, title, thumbnail, score, backend}. Without IMG, reads records from stdin (task records work: their first image is searched and, for --backend precomputed, their image_search_* fields answer). A failed search is reported on stderr and the exit status is 1.

    Example: mars index images photos/ --out idx && mars image-search --image-index idx crop.jpg
    """
    from mars_cli.errors import MarsError
    from mars_cli.jsonl import RecordWriter, Where, read_located
    from mars_cli.tools.image_search import image_search_records, open_image_search

    search = open_image_search(backend, index=str(index) if index else None, cache=str(cache) if cache else None, replay=replay,
                               model=str(model) if model else None, data_dir=str(data_dir) if data_dir else None,
                               serper_url=serper_url, artifacts=str(artifacts) if artifacts else None, rate_limit=rate_limit,
                               timeout=timeout, retries=retries, backoff=backoff, allow_private=allow_private)
    items = [(Where("<args>", n), {"image": img}) for n, img in enumerate(images, 1)] if images else read_located(None, skip_bad=skip_bad)
    failures: list[str] = []
    with RecordWriter(output) as w:
        for rec in image_search_records(items, search, k=k, group=group, failures=failures, warn=not images or len(images) > 1):
            w.write(rec)
    if failures:
        raise MarsError(failures[0] if images and len(images) == 1 else f"{len(failures)} of the searches failed (see above)")
