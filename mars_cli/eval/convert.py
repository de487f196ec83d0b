"""Benchmark files → task records: the row readers, the image store and the driver.

`convert(fmt, inputs, out_dir)` reads every input of one published format, turns each row
into a task record (see mars_cli/eval/formats/) and writes DIR/tasks.jsonl, with every image
stored once under DIR/images/ named by its content hash, so a converted benchmark is
self-contained and re-converting is stable. The directory is written to a temporary name
and swapped into place only when every row converted: a bad row leaves nothing behind.

Rows are streamed: parquet one record batch at a time (a 10 GB parquet file never sits in
memory), JSONL/TSV line by line. Images may arrive as {"bytes": …} dicts (HF datasets),
raw bytes, base64 text, data: URIs, or paths relative to the input file (or --image-root).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mars_cli.errors import MarsError, RecordError
from mars_cli.fsutil import atomic_dir
from mars_cli.spool import content_name, store

# Magic bytes → file extension for stored images.
_MAGIC = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


class RowError(Exception):
    """A problem with one row; the driver adds the file and row number."""


def image_extension(data: bytes) -> str | None:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


@dataclass
class Context:
    """What a format's row function may use: the image store, the source file, options."""

    images_dir: Path  # where image files are written now (inside the temporary directory)
    final_images: Path  # where they will be once the directory is in place
    source: Path  # the input file the row came from
    image_root: Path | None = None
    seed: int = 0
    benchmark: str | None = None  # overrides the format's benchmark name
    stored: dict = field(default_factory=dict)
    dataset: dict | None = None  # the manifest entry the file came from (name, system prompt, scoring, repeats)

    def base(self) -> Path:
        return self.image_root if self.image_root is not None else self.source.parent

    def image(self, value: Any) -> str:
        """Store an image given in any supported shape; return its path in the records."""
        data = image_bytes(value, self.base())
        ext = image_extension(data)
        if ext is None:
            raise RowError("image data is not a JPEG, PNG, WebP, GIF, BMP or TIFF file")
        name = content_name(data, ext)
        if name not in self.stored:
            store(self.images_dir, data, name=name)
            self.stored[name] = str(self.final_images / name)
        return self.stored[name]


def image_bytes(value: Any, base: Path) -> bytes:
    """The encoded bytes of an image given as bytes, a bytes dict, base64, or a path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return image_bytes(value["bytes"], base)
        if value.get("path"):
            return image_bytes(str(value["path"]), base)
        if value.get("image"):
            return image_bytes(value["image"], base)
        raise RowError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise RowError("image bytes are empty")
        return data
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"no image (got {type(value).__name__})")
    text = value.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
        return _b64(text)
    if text.startswith(("http://", "https://")):
        raise RowError(f"image is a URL ({text[:80]}); download the images and pass --image-root")
    if len(text) < 1024:
        path = Path(text)
        if not path.is_absolute():
            path = base / path
        if path.exists():
            from mars_cli.images import read_image_file

            try:  # the bounded reader: a regular file within MARS_MAX_IMAGE_BYTES, an image
                return read_image_file(path)[0]
            except MarsError as e:
                raise RowError(str(e)) from None
        if len(text) <= 256:
            raise RowError(f"image file not found: {path}")
    # A long string that is not a file is base64 image data (HR-Bench, MME-RealWorld TSV).
    return _b64(text)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise RowError(f"image is not valid base64 ({e})") from None


# --- row readers ------------------------------------------------------------------------

def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row) of a parquet, JSONL, JSON or TSV file, streamed."""
    suffix = _kind(path)
    if suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix in (".tsv", ".csv"):
        yield from _table_rows(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise MarsError(f"{path}: unknown file type {suffix or '(none)'} (not parquet, JSON Lines, JSON or TSV by its first bytes either); expected .parquet/.pq, .jsonl, .json or .tsv")


def _kind(path: Path) -> str:
    """The file's type by extension (.pq is parquet), else by its first bytes."""
    suffix = path.suffix.lower()
    if suffix == ".pq":
        return ".parquet"
    if suffix in (".parquet", ".jsonl", ".ndjson", ".json", ".tsv", ".csv"):
        return suffix
    try:
        with open(path, "rb") as f:
            line = f.readline()  # a JSONL row with an embedded image can be megabytes long
    except OSError as e:
        raise MarsError(f"{path}: cannot read ({e.strerror})") from None
    text = line.lstrip(b"\xef\xbb\xbf \t\r")
    if line.startswith(b"PAR1"):
        return ".parquet"
    if text.startswith(b"{"):
        try:
            json.loads(text)
            return ".jsonl"  # the first line is a whole object
        except ValueError:
            return ".json"
    if text.startswith(b"["):
        return ".json"
    if b"\t" in line:
        return ".tsv"
    return suffix


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise MarsError(f"{path}: not a readable parquet file ({e})") from None
    n = 0
    # Small batches: rows with embedded 4K images are several MB each.
    for batch in pf.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    from mars_cli.jsonl import read_located

    for where, rec in read_located([path]):
        yield where.line, rec


def _json_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MarsError(f"{path}: invalid JSON ({e})") from None
    if isinstance(data, dict):
        # One row per file (V* style), or a {"data": [...]} wrapper.
        data = data.get("data", [data]) if isinstance(data.get("data"), list) else [data]
    if not isinstance(data, list):
        raise MarsError(f"{path}: expected a JSON list of rows or one row object")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise RecordError(str(path), i, f"row {i} is not an object")
        yield i, row


def _table_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    # Base64 image cells are far larger than csv's default 128 KB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for i, row in enumerate(reader, 1):
            yield i + 1, row  # +1: the header is line 1


# --- the driver -------------------------------------------------------------------------

def expand_inputs(fmt: str, inputs: list[str]) -> list[tuple[Path, Path | None, dict | None]]:
    """(input file, image root or None, manifest entry or None); a directory expands to the
    files the format reads, and a SenseNova-MARS manifest (.json of {name: {"annotation",
    "root", …}}) to its files, each with its dataset's settings (see `dataset_settings`)."""
    from mars_cli.eval.formats import FORMATS

    spec = FORMATS[fmt]
    out: list[tuple[Path, Path | None, dict | None]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _kind_by_name(q) in spec.dir_suffixes)
            if not found:
                raise MarsError(f"{p}: no {'/'.join(spec.dir_suffixes)} files inside")
            out.extend((q, None, None) for q in found)
        elif p.is_file():
            if fmt == "sensenova-mars" and p.suffix.lower() == ".json":
                out.extend(_manifest_files(p))
            else:
                out.append((p, None, None))
        else:
            raise MarsError(f"{p}: no such file or directory")
    return out


def _kind_by_name(path: Path) -> str:
    return ".parquet" if path.suffix.lower() == ".pq" else path.suffix.lower()


SCORE_METHODS = {"em_score_mcq": "mcq", "llm_score": "llm"}  # the official scorers → mars scorers


def dataset_settings(name: str, entry: dict, where: str) -> dict:
    """A manifest entry's settings as the official eval.py reads them.

    Scoring: `reward_fn` merged with `unused_reward_fn` (`format_score` is the format
    reward, not a scorer); em_score_mcq → the `mcq` rule scorer, llm_score → `llm`, the
    rule scorer winning when a dataset lists both. `system_prompt` and `format_instruction`
    come from input_template.arguments; `repeat_time` (default 1) repeats the rows.
    """
    methods = [m for m in list(entry.get("reward_fn") or []) + list(entry.get("unused_reward_fn") or []) if m != "format_score"]
    unknown = sorted({m for m in methods if m not in SCORE_METHODS})
    if unknown:
        raise MarsError(f"{where}: dataset {name!r}: unknown scoring method(s) {', '.join(unknown)} "
                        f"(known: {', '.join(SCORE_METHODS)}, format_score)")
    scorer = "mcq" if "em_score_mcq" in methods else "llm" if methods else None
    args = (entry.get("input_template") or {}).get("arguments") or {}
    repeat = entry.get("repeat_time", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not repeat > 0:
        raise MarsError(f"{where}: dataset {name!r}: repeat_time must be a positive number, got {repeat!r}")
    return {"name": str(name), "scorer": scorer, "score_methods": sorted(set(methods)),
            "system_prompt": args.get("system_prompt") or None,
            "format_instruction": args.get("format_instruction") or None, "repeat_time": repeat}


def repeat_rows(rows: list, repeat: float, seed: int, key: str) -> list:
    """Rows repeated as the official loader does: int(r) full copies, then a seeded sample
    of the fraction (so 1.5 gives every row once and half of them twice)."""
    import random

    out = list(rows) * int(repeat)
    extra = int(len(rows) * (repeat - int(repeat)))
    if extra:
        out += random.Random(f"{seed}:{key}").sample(list(rows), extra)
    return out


def _manifest_files(path: Path) -> list[tuple[Path, Path | None, dict | None]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MarsError(f"{path}: invalid JSON manifest ({e})") from None
    entries = list(data.items()) if isinstance(data, dict) else list(enumerate(data)) if isinstance(data, list) else []
    if not entries:
        raise MarsError(f"{path}: the manifest lists no datasets")
    out = []
    for name, entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
            raise MarsError(f"{path}: dataset {name!r} has no 'annotation' path")
        ann = Path(entry["annotation"])
        ann = ann if ann.is_absolute() else path.parent / ann
        if not ann.is_file():
            raise MarsError(f"{path}: dataset {name!r}: annotation file {ann} not found")
        root = entry.get("root")
        root = None if not root else (Path(root) if Path(root).is_absolute() else path.parent / root)
        out.append((ann, root, dataset_settings(name, entry, str(path))))
    return out


def convert(
    fmt: str,
    inputs: list[str],
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    image_root: str | None = None,
    benchmark: str | None = None,
    limit: int | None = None,
    on_task: Callable[[dict], None] | None = None,
) -> dict:
    """Convert benchmark files of format `fmt` into DIR/tasks.jsonl + DIR/images/.

    Returns a summary {"format", "tasks", "images", "out"}.
    """
    from mars_cli.errors import UsageError
    from mars_cli.eval.detect import detect, wrong_format_message
    from mars_cli.eval.formats import FORMATS
    from mars_cli.jsonl import RecordWriter
    from mars_cli.records import validate

    if fmt == "auto":
        if not inputs:
            raise MarsError("no input files")
        fmt = detect(Path(inputs[0]))
    if fmt not in FORMATS:
        raise MarsError(f"unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    spec = FORMATS[fmt]
    files = expand_inputs(fmt, inputs)
    # Absolute image paths: the tasks then run from any directory, read from a file or stdin.
    out_dir = Path(os.path.abspath(out_dir))
    root = Path(image_root) if image_root else None
    count = 0
    seen: set = set()
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        ctx = Context(tmp / "images", out_dir / "images", files[0][0], seed=seed, benchmark=benchmark)
        with RecordWriter(tmp / "tasks.jsonl") as w:
            for path, file_root, dataset in files:
                if spec.file_filter is not None and not spec.file_filter(path):
                    continue
                ctx.source = path
                ctx.image_root = root or file_root
                ctx.dataset = dataset
                rows = iter_rows(path)
                if dataset is not None and dataset["repeat_time"] != 1:
                    rows = _repeated(rows, dataset["repeat_time"], seed, str(path))
                for rowno, row in rows:
                    if limit is not None and count >= limit:
                        break
                    refused = wrong_format_message(row, fmt)
                    if refused:
                        raise UsageError(f"{path}:{rowno}: {refused}")
                    try:
                        task = spec.row(row, rowno, ctx)
                    except RowError as e:
                        raise RecordError(str(path), rowno, f"row {rowno}: {e}") from None
                    except RecordError:
                        raise
                    except MarsError as e:  # a task field that fails the record contract
                        raise RecordError(str(path), rowno, f"row {rowno}: {e}") from None
                    except (KeyError, TypeError, ValueError) as e:
                        raise RecordError(str(path), rowno, f"row {rowno}: bad {fmt} row ({type(e).__name__}: {e})") from None
                    if task is None:
                        continue
                    if task["id"] in seen:
                        raise RecordError(str(path), rowno, f"row {rowno}: duplicate task id {task['id']!r}")
                    seen.add(task["id"])
                    validate(task, "task", f"{path}:{rowno}")
                    w.write(task)
                    count += 1
                    if on_task is not None:
                        on_task(task)
    return {"format": fmt, "tasks": count, "images": len(ctx.stored), "out": str(out_dir)}


def _repeated(rows: Iterator[tuple[int, dict]], repeat: float, seed: int, key: str) -> Iterator[tuple[int, dict]]:
    """(row number, row) with each copy after the first marked `_repeat` = k (its id gets ~k)."""
    listed = list(rows)
    seen: dict[int, int] = {}
    for rowno, row in repeat_rows(listed, repeat, seed, key):
        k = seen.get(rowno, 0)
        seen[rowno] = k + 1
        yield rowno, (row if k == 0 else {**row, "_repeat": k})
