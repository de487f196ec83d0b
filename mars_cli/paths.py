"""Where a relative path in a record points: beside the record's file, then the cwd.

A record file travels with its images (`mars data convert -o bench/` writes
bench/tasks.jsonl and bench/images/), so a relative image path in a record read from a
file is resolved against that file's folder first, whatever directory the command runs
in. Paths in records read from stdin stay relative to the current directory, as do
paths that exist only there (older files written relative to where they were made).
A path found nowhere is returned as written, so the error that follows names it as the
record gave it.
"""

from __future__ import annotations

import os
from pathlib import Path


def record_dir(where) -> Path | None:
    """The folder of the file a record came from (None for stdin or no origin)."""
    source = getattr(where, "source", None)
    if not source or source in ("<stdin>", "-", "<args>"):
        return None
    return Path(source).parent


def resolve(path: str, where=None, base: str | os.PathLike | None = None) -> str:
    """`path` from a record, made to point at an existing file where one can be found.

    URLs and absolute paths are returned unchanged. `base` (a flag such as --image-root)
    wins over the record's folder.
    """
    if not isinstance(path, str) or not path or "://" in path or path.startswith("data:") or os.path.isabs(path):
        return path
    for folder in (Path(base) if base is not None else None, record_dir(where)):
        if folder is not None:
            candidate = folder / path
            if candidate.exists():
                return str(candidate.absolute())
    return path


def resolve_task_images(rec: dict, where=None, base=None) -> dict:
    """The task's `images` resolved in place (see `resolve`); returns the record."""
    images = rec.get("images")
    if isinstance(images, list):
        rec["images"] = [resolve(p, where, base) if isinstance(p, str) else p for p in images]
    return rec


def resolve_record_images(rec: dict, where=None, base=None) -> dict:
    """Every image path of a task or trajectory record resolved in place: the task's
    `images`, image parts of `messages` (question images, crops, thumbnails) and
    `tokens.images`. Returns the record."""
    resolve_task_images(rec, where, base)
    for msg in rec.get("messages") or []:
        parts = msg.get("content") if isinstance(msg, dict) else None
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, dict) and part.get("type") == "image" and isinstance(part.get("image"), str):
                part["image"] = resolve(part["image"], where, base)
    tokens = rec.get("tokens")
    if isinstance(tokens, dict) and isinstance(tokens.get("images"), list):
        tokens["images"] = [resolve(p, where, base) if isinstance(p, str) else p for p in tokens["images"]]
    return rec
