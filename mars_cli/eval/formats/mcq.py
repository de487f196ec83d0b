"""Multiple-choice perception benchmarks: V* Bench, HR-Bench, MME-RealWorld (`scorer: mcq`).

The gold is the option letter; `choices` hold the option texts without their labels
(the protocol adds "A. …" when it shows them).
"""

from __future__ import annotations

import string
from pathlib import Path

from mars_cli.eval.convert import Context, RowError
from mars_cli.eval.formats.common import shuffled_options, strip_label, text
from mars_cli.records import make_task

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def is_vstar_file(path: Path) -> bool:
    """Inside a V* folder, only the per-image annotation files (they sit beside an image)."""
    if path.suffix.lower() != ".json":
        return True
    return any(path.with_suffix(s).exists() for s in _IMAGE_SUFFIXES)


def _vstar_image(row: dict, ctx: Context) -> str:
    if row.get("image"):
        return ctx.image(row["image"])
    for s in _IMAGE_SUFFIXES:
        p = ctx.source.with_suffix(s)
        if p.exists():
            return ctx.image(str(p))
    raise RowError("no 'image' field and no image file beside the annotation")


def vstar_row(row: dict, rowno: int, ctx: Context) -> dict:
    """A per-image V* json (the correct option listed first) or a jsonl row."""
    options = row.get("options")
    if not isinstance(options, list) or len(options) < 2:
        raise RowError("'options' must be a list of at least two options")
    options = [strip_label(o) for o in options]
    label = text(row, "label", "answer", required=False)
    correct = string.ascii_uppercase.index(label.strip("() ").upper()) if label and len(label.strip("() ")) == 1 else 0
    if correct >= len(options):
        raise RowError(f"answer {label!r} is not one of the {len(options)} options")
    if ctx.source.suffix.lower() == ".json":
        category = ctx.source.parent.name
        qid = f"{category}-{ctx.source.stem}"
    else:
        category = text(row, "category", required=False) or "unknown"
        qid = text(row, "question_id", "id", required=False) or str(rowno)
    choices, letter = shuffled_options(options, correct, qid, ctx.seed)
    question = text(row, "question", "text")
    return make_task(
        f"vstar-{qid}",
        question,
        images=[_vstar_image(row, ctx)],
        answers=[letter],
        choices=choices,
        benchmark=ctx.benchmark or "vstar",
        scorer="mcq",
        meta={"category": category},
    )


def _letter_options(row: dict, letters: str) -> list[str]:
    opts = []
    for c in letters:
        v = row.get(c)
        if v is None or (isinstance(v, str) and not v.strip()) or v != v:  # v != v: a NaN cell
            break
        opts.append(str(v).strip())
    if len(opts) < 2:
        raise RowError(f"expected option columns {', '.join(letters[:2])}…")
    return opts


def _gold_letter(row: dict, n: int, *keys: str) -> str:
    g = text(row, *keys).strip("() ").upper()[:1]
    if g not in string.ascii_uppercase[:n]:
        raise RowError(f"answer {g!r} is not one of the {n} options")
    return g


def hrbench_row(row: dict, rowno: int, ctx: Context) -> dict:
    stem = ctx.source.stem.lower()
    name = "hr-bench-8k" if "8k" in stem else "hr-bench-4k" if "4k" in stem else "hr-bench"
    idx = text(row, "index")
    choices = _letter_options(row, "ABCD")
    meta = {k: row[k] for k in ("category", "cycle_category") if row.get(k)}
    return make_task(
        f"{name}-{idx}",
        text(row, "question"),
        images=[ctx.image(text(row, "image"))],
        answers=[_gold_letter(row, len(choices), "answer")],
        choices=choices,
        benchmark=ctx.benchmark or name,
        scorer="mcq",
        meta=meta,
    )


def mme_realworld_row(row: dict, rowno: int, ctx: Context) -> dict:
    """The released json (Question_id, Image, Text, Answer choices, Ground truth) or a TSV."""
    if "Text" in row or "Question_id" in row:
        raw = row.get("Answer choices", row.get("Answer Choices"))
        if not isinstance(raw, list) or len(raw) < 2:
            raise RowError("'Answer choices' must be a list of options")
        choices = [strip_label(o) for o in raw]
        qid = text(row, "Question_id")
        meta = {k.lower(): row[k] for k in ("Task", "Subtask", "Category") if row.get(k)}
        return make_task(
            f"mme-realworld-{qid}",
            text(row, "Text"),
            images=[ctx.image(text(row, "Image"))],
            answers=[_gold_letter(row, len(choices), "Ground truth")],
            choices=choices,
            benchmark=ctx.benchmark or "mme-realworld",
            scorer="mcq",
            meta=meta,
        )
    choices = _letter_options(row, "ABCDE")
    meta = {k: row[k] for k in ("category", "l2-category", "subtask") if row.get(k)}
    return make_task(
        f"mme-realworld-{text(row, 'index')}",
        text(row, "question"),
        images=[ctx.image(text(row, "image"))],
        answers=[_gold_letter(row, len(choices), "answer")],
        choices=choices,
        benchmark=ctx.benchmark or "mme-realworld",
        scorer="mcq",
        meta=meta,
    )
