"""Which benchmark format a file is, from its columns; and rows a format would misread.

`--format auto` reads the first row of the first input and scores each format by the
columns only it has (`candidate_answers` inside `reward_model` is FVQA's, precomputed
`image_search_*` lists are SenseNova-MARS's, `cycle_category` is HR-Bench's…). A tie or
no match is an error that lists what was seen: guessing wrong changes scores.

`dropped_answers` is the other half: formats share columns, so a wrong but compatible
--format converts without an error and quietly leaves out gold answers the right one
reads (FVQA rows as sensenova-mars lose their candidate answers). Every row is checked
for answer columns the chosen format does not read.
"""

from __future__ import annotations

from pathlib import Path

from mars_cli.errors import MarsError

# Columns that mark a format (dotted = inside an object column), with a weight each.
SIGNATURES: dict[str, dict[str, float]] = {
    "hr-mmsearch": {"query_image": 1, "ground_truth": 2, "query": 0.5},
    "mmsearch": {"gt_answer": 2, "alternative_gt_answers": 2, "query": 0.5, "area": 0.5},
    "fvqa": {"reward_model.candidate_answers": 3, "reward_model": 1, "prompt": 0.5, "images": 0.5, "extra_info": 0.5},
    "sensenova-mars": {"image_search_title_list": 3, "image_search_thumbnail_list": 3, "reward_model": 1,
                       "image": 0.5, "prompt": 0.5, "*.annotation": 4},
    "vstar": {"options": 2, "label": 1},
    "hr-bench": {"cycle_category": 3, "A": 0.5, "B": 0.5, "answer": 0.5, "index": 0.5},
    "mme-realworld": {"Question_id": 3, "Answer choices": 2, "Answer Choices": 2, "Ground truth": 2, "l2-category": 3,
                      "E": 0.5},
}

# Columns that hold gold answers, and which of them each format reads.
ANSWER_COLUMNS = ("ground_truth", "gt_answer", "alternative_gt_answers", "reward_model.ground_truth",
                  "reward_model.candidate_answers", "answer", "label", "Ground truth")
READS: dict[str, set[str]] = {
    "hr-mmsearch": {"ground_truth"},
    "mmsearch": {"gt_answer", "alternative_gt_answers"},
    "fvqa": {"reward_model.ground_truth", "reward_model.candidate_answers"},
    "sensenova-mars": {"reward_model.ground_truth", "answer"},
    "vstar": {"label", "answer"},
    "hr-bench": {"answer"},
    "mme-realworld": {"answer", "Ground truth"},
}


def _has(row: dict, key: str) -> bool:
    if key.startswith("*."):  # a manifest: {name: {"annotation": …}}
        return any(isinstance(v, dict) and key[2:] in v for v in row.values())
    head, _, rest = key.partition(".")
    value = row.get(head)
    if rest:
        return isinstance(value, dict) and _has(value, rest)
    return value not in (None, "", [], {}) and value == value  # value == value: not a NaN cell


def scores(row: dict) -> dict[str, float]:
    return {fmt: sum(w for k, w in sig.items() if _has(row, k)) for fmt, sig in SIGNATURES.items()}


def detect_row(row: dict) -> str | None:
    """The format whose signature this row fits best, or None when it is not clear."""
    ranked = sorted(scores(row).items(), key=lambda kv: -kv[1])
    (best, top), (_, second) = ranked[0], ranked[1]
    return best if top >= 2 and top > second else None


def detect(path: Path) -> str:
    """The format of a benchmark file (or a folder's first file); MarsError when unclear."""
    from mars_cli.eval.convert import iter_rows

    files = [path] if path.is_file() else sorted(
        q for q in path.rglob("*") if q.is_file() and q.suffix.lower() in (".parquet", ".pq", ".jsonl", ".json", ".tsv"))
    if not files:
        raise MarsError(f"{path}: no benchmark files inside to detect a format from")
    first = files[0]
    for _, row in iter_rows(first):
        fmt = detect_row(row)
        if fmt is None:
            cols = ", ".join(sorted(map(str, row))[:12])
            raise MarsError(f"{first}: cannot tell the benchmark format from its columns ({cols}); pass --format")
        return fmt
    raise MarsError(f"{first}: no rows to detect a format from; pass --format")


def dropped_answers(row: dict, fmt: str) -> list[str]:
    """Answer columns this row fills that `fmt` does not read."""
    return [k for k in ANSWER_COLUMNS if k not in READS.get(fmt, set()) and _has(row, k)]


def wrong_format_message(row: dict, fmt: str) -> str | None:
    """Why converting this row as `fmt` would lose gold answers, or None."""
    lost = dropped_answers(row, fmt)
    if not lost:
        return None
    guess = detect_row(row)
    hint = f"it looks like {guess}: use --format {guess} (or auto)" if guess and guess != fmt else "check --format"
    return (f"column {', '.join(repr(k) for k in lost)} holds gold answers that --format {fmt} does not read, "
            f"so they would be dropped and scores would change; {hint}")
