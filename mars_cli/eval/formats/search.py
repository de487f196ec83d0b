"""Search benchmarks: HR-MMSearch, MMSearch end-to-end, FVQA, SenseNova-MARS jsonl.

All are open-ended questions scored by the LLM judge (`scorer: llm`; an exact match
after normalization short-circuits it).
"""

from __future__ import annotations

from mars_cli.eval.convert import Context, RowError
from mars_cli.eval.formats.common import answer_list, images_of, prompt_text, text
from mars_cli.records import make_task


def _meta(row: dict, *keys: str) -> dict:
    return {k: row[k] for k in keys if row.get(k) not in (None, "")}


def hr_mmsearch_row(row: dict, rowno: int, ctx: Context) -> dict:
    sid = text(row, "sample_id", "id", required=False) or str(rowno)
    answers = answer_list(row.get("ground_truth"))
    if not answers:
        raise RowError("missing 'ground_truth'")
    images = [ctx.image(v) for v in images_of(row.get("query_image"))]
    if not images:
        raise RowError("missing 'query_image'")
    return make_task(
        f"hr-mmsearch-{sid}",
        text(row, "query", "question"),
        images=images,
        answers=answers,
        benchmark=ctx.benchmark or "hr-mmsearch",
        scorer="llm",
        meta={"sample_id": sid, **_meta(row, "difficulty", "category")},
    )


def mmsearch_row(row: dict, rowno: int, ctx: Context) -> dict:
    sid = text(row, "sample_id", "id", required=False) or str(rowno)
    answers = answer_list(row.get("gt_answer"), row.get("alternative_gt_answers"))
    if not answers:
        raise RowError("missing 'gt_answer'")
    # Some MMSearch questions have no image; the query alone is the task.
    images = [ctx.image(v) for v in images_of(row.get("query_image")) if v not in (None, "", {})]
    return make_task(
        f"mmsearch-{sid}",
        text(row, "query"),
        images=images,
        answers=answers,
        benchmark=ctx.benchmark or "mmsearch",
        scorer="llm",
        meta={"sample_id": sid, **_meta(row, "area", "subfield")},
    )


def _row_id(row: dict, rowno: int) -> str:
    extra = row.get("extra_info")
    if isinstance(extra, dict) and extra.get("index") is not None:
        return str(extra["index"])
    return text(row, "id", "sample_id", "index", required=False) or str(rowno)


def fvqa_row(row: dict, rowno: int, ctx: Context) -> dict:
    rm = row.get("reward_model") or {}
    if not isinstance(rm, dict):
        raise RowError("'reward_model' must be an object")
    answers = answer_list(rm.get("ground_truth"), rm.get("candidate_answers"))
    if not answers:
        raise RowError("missing 'reward_model.ground_truth'")
    images = [ctx.image(v) for v in images_of(row.get("images"))]
    return make_task(
        f"fvqa-{_row_id(row, rowno)}",
        prompt_text(row.get("prompt")),
        images=images,
        answers=answers,
        benchmark=ctx.benchmark or "fvqa",
        scorer="llm",
        meta=_meta(row, "category", "data_source"),
    )


def sensenova_row(row: dict, rowno: int, ctx: Context) -> dict:
    """SenseNova-MARS training/eval jsonl: prompt with <image>, image path(s), reward_model.

    Precomputed image-search results (titles and thumbnails) stay top-level task fields,
    where the `precomputed` image-search backend reads them; thumbnails are stored too.
    """
    rm = row.get("reward_model") or {}
    answers = answer_list(rm.get("ground_truth") if isinstance(rm, dict) else None, row.get("answer"))
    if not answers:
        raise RowError("missing 'reward_model.ground_truth'")
    images = [ctx.image(v) for v in images_of(row.get("image", row.get("images")))]
    source = text(row, "data_source", required=False) or ctx.source.stem
    task = make_task(
        f"{source}-{_row_id(row, rowno)}",
        prompt_text(row.get("prompt", row.get("question"))),
        images=images,
        answers=answers,
        benchmark=ctx.benchmark or source,
        scorer="llm",
        meta=_meta(row, "category", "difficulty", "data_source"),
    )
    titles = row.get("image_search_title_list")
    thumbs = row.get("image_search_thumbnail_list")
    if titles is not None:
        task["image_search_title_list"] = [str(t) for t in images_of(titles)]
    if thumbs is not None:
        task["image_search_thumbnail_list"] = [ctx.image(t) for t in images_of(thumbs)]
    return task
