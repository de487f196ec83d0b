"""`mars index text|images`: build the local search indexes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mars_cli.flags import renamed

app = typer.Typer(help="Build local search indexes: text or images.",
                  no_args_is_help=True)


@app.command("text")
def text(
    corpus: Optional[List[Path]] = typer.Argument(None, help="Corpus JSONL files (default: stdin): {id, contents} (FlashRAG) or {id, title, text[, url]}."),
    out: Path = typer.Option(..., "--out", "-o", help="Index directory to write (replaced atomically)."),
    dense_model: Optional[Path] = typer.Option(None, "--dense-model", envvar="MARS_DENSE_MODEL", help="Local sentence-transformers model: also build a faiss dense index."),
    chunk: int = typer.Option(20_000, "--chunk", min=1, help="Passages per streamed chunk (bounds memory)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable lines with a warning."),
) -> None:
    """Index a text corpus for `mars search` (streamed; millions of passages fit in bounded memory).

    Prints the index manifest as one record. Example: mars index text wiki-18.jsonl --out wiki-idx
    """
    from mars_cli.jsonl import RecordWriter, read_located
    from mars_cli.progress import count_lines
    from mars_cli.tools.embed import load_embedder
    from mars_cli.tools.index_text import build_text_index, parse_passage

    embedder = load_embedder(str(dense_model)) if dense_model else None
    passages = (parse_passage(rec, where) for where, rec in read_located(corpus, skip_bad=skip_bad))
    source = ",".join(str(p) for p in corpus) if corpus else "<stdin>"
    manifest = build_text_index(passages, out, embedder=embedder, chunk=chunk, source=source,
                                total=count_lines(corpus))
    with RecordWriter(None) as w:
        w.write({"index": str(out), **manifest})


@app.command("images")
@renamed({"--model": "--image-model"})
def images(
    source: Path = typer.Argument(..., help="An image folder (titles from titles.jsonl/titles.tsv in it) or a JSONL of {image, title} records."),
    out: Path = typer.Option(..., "--out", "-o", help="Index directory to write (replaced atomically)."),
    model: Optional[Path] = typer.Option(None, "--image-model", envvar="MARS_IMAGE_MODEL", help="Local CLIP-style sentence-transformers model (default: weight-free pHash + colour layout)."),
    thumb_size: int = typer.Option(256, "--thumb-size", min=16, help="Longest side of the stored thumbnails."),
) -> None:
    """Index images for `mars image-search` (thumbnails are written into the index).

    Prints the index manifest as one record. Example: mars index images photos/ --out photo-idx
    """
    from mars_cli.jsonl import RecordWriter
    from mars_cli.tools.embed import load_embedder
    from mars_cli.tools.index_images import build_image_index, collect_images

    embedder = load_embedder(str(model), images=True) if model else None
    manifest = build_image_index(collect_images(source), out, embedder=embedder, thumb_size=thumb_size, source=str(source))
    with RecordWriter(None) as w:
        w.write({"index": str(out), **manifest})
