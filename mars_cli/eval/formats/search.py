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


def _official_question(prompt) -> str:
    """The question as the official eval.py reads it: the first user message's text with
    "<image>" removed, stripped (kept byte for byte: it is part of the prompt)."""
    from mars_cli.sensenova import manifest_question

    if isinstance(prompt, list):
        for m in prompt:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                q = manifest_question(m["content"])
                if not q:
                    raise RowError("prompt is empty")
                return q
    return prompt_text(prompt)


def sensenova_row(row: dict, rowno: int, ctx: Context) -> dict:
    """SenseNova-MARS training/eval jsonl: prompt with <image>, image path(s), reward_model.

    From a manifest (test_all.json, train_*.json) each dataset's settings apply: its
    scoring (reward_fn with unused_reward_fn: em_score_mcq → scorer mcq, llm_score → llm),
    its system prompt (meta.system_prompt, which `--protocol sensenova` puts before the
    tools block) and repeat_time; ids are "{dataset}-{line index}" as in eval.py, a
    repeated row's copies "~1", "~2", ….

    Precomputed image-search results (titles and thumbnails) stay top-level task fields,
    where the `precomputed` image-search backend reads them; thumbnails are stored too.
    """
    rm = row.get("reward_model") or {}
    answers = answer_list(rm.get("ground_truth") if isinstance(rm, dict) else None, row.get("answer"))
    if not answers:
        raise RowError("missing 'reward_model.ground_truth'")
    images = [ctx.image(v) for v in images_of(row.get("image", row.get("images")))]
    ds = ctx.dataset
    source = (ds or {}).get("name") or text(row, "data_source", required=False) or ctx.source.stem
    meta = _meta(row, "category", "difficulty", "data_source")
    if ds:
        meta.update({k: ds[k] for k in ("system_prompt", "format_instruction") if ds.get(k)})
        meta["score_methods"] = ds["score_methods"]
        tid = f"{source}-{rowno - 1}"
    else:
        tid = f"{source}-{_row_id(row, rowno)}"
    if row.get("_repeat"):
        tid += f"~{row['_repeat']}"
        meta["repeat"] = row["_repeat"]
    task = make_task(
        tid,
        _official_question(row.get("prompt", row.get("question"))),
        images=images,
        answers=answers,
        benchmark=ctx.benchmark or source,
        scorer=(ds or {}).get("scorer") or "llm",
        meta=meta,
    )
    titles = row.get("image_search_title_list")
    thumbs = row.get("image_search_thumbnail_list")
    if titles is not None:
        task["image_search_title_list"] = [str(t) for t in images_of(titles)]
    if thumbs is not None:
        task["image_search_thumbnail_list"] = [ctx.image(t) for t in images_of(thumbs)]
    return task
