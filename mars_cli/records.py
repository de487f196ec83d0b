"""The record contract: the fields each stage adds, defined once and validated here.

Every stage reads records, checks the fields it needs with `validate(rec, kind, where)`,
adds its own fields and passes every other field through unchanged and in order.
The kinds build on each other: task ⊂ trajectory ⊂ judged ⊂ scored (advantage added).
See `man 5 mars-records` for the prose version.
"""

from __future__ import annotations

from typing import Any

from mars_cli.errors import MarsError, RecordError

SCHEMA_VERSION = 1

SCORERS = ("llm", "mcq", "em", "substring", "f1", "simpleqa")
FINISH_REASONS = ("answer", "max_turns", "max_tokens", "no_action", "malformed", "error")
KINDS = ("task", "trajectory", "judged", "scored")


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_num_or_null(v: Any) -> bool:
    return v is None or _is_num(v)


# field -> (check, description, required)
TASK_FIELDS: dict[str, tuple] = {
    "id": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a string", True),
    "question": (lambda v: isinstance(v, str), "a string", True),
    "images": (_is_str_list, "a list of image paths or URLs", False),
    "answers": (_is_str_list, "a list of gold answer strings", False),
    "choices": (lambda v: v is None or (_is_str_list(v) and len(v) <= 26), "a list of at most 26 strings (A–Z) or null",
                False),
    "benchmark": (lambda v: isinstance(v, str), "a string", False),
    "scorer": (lambda v: v is None or v in SCORERS, "one of " + ", ".join(SCORERS), False),
    "meta": (lambda v: isinstance(v, dict), "an object", False),
}


def _tokens_ok(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, dict):
        return False
    ids, mask = v.get("ids"), v.get("mask")
    if not isinstance(ids, list) or not isinstance(mask, list) or len(ids) != len(mask):
        return False
    lp = v.get("logprobs")
    return lp is None or (isinstance(lp, list) and len(lp) == len(ids))


def _content_ok(c: Any) -> bool:
    if c is None or isinstance(c, str):
        return True
    return isinstance(c, list) and all(isinstance(p, dict) and isinstance(p.get("type", "text"), str) for p in c)


def _messages_ok(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and _content_ok(m.get("content")) for m in v)


def _tool_calls_ok(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(c, dict) and (c.get("name") is None or isinstance(c.get("name"), str))
        and isinstance(c.get("ok", True), bool) for c in v)


TRAJECTORY_FIELDS: dict[str, tuple] = {
    "group": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a string (the task id)", True),
    "sample": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", True),
    "messages": (_messages_ok, "a list of chat messages ({role, content} objects; content a string or "
                 "a list of {type, …} objects)", True),
    "tool_calls": (_tool_calls_ok, "a list of tool call objects ({name, arguments, ok, …})", False),
    "prediction": (lambda v: v is None or isinstance(v, str), "a string or null", True),
    "finish": (lambda v: v in FINISH_REASONS, "one of " + ", ".join(FINISH_REASONS), True),
    "tokens": (_tokens_ok, "null or {ids, mask, logprobs} lists of equal length", False),
    "policy": (lambda v: isinstance(v, dict), "an object", False),
}

JUDGED_FIELDS: dict[str, tuple] = {
    "rewards": (
        lambda v: isinstance(v, dict) and all(_is_num_or_null(x) for x in v.values()),
        "an object of numbers or nulls",
        True,
    ),
    "reward": (_is_num_or_null, "a number or null", True),
    "judge": (lambda v: isinstance(v, dict), "an object", False),
}

SCORED_FIELDS: dict[str, tuple] = {
    "advantage": (_is_num, "a number", True),
    "advantage_stats": (lambda v: isinstance(v, dict), "an object", False),
    "batch": (lambda v: isinstance(v, dict) and isinstance(v.get("id"), str) and isinstance(v.get("size"), int)
              and not isinstance(v.get("size"), bool) and v["size"] >= 1, "an object {id: string, size: positive integer}", False),
}

_BY_KIND = {
    "task": (TASK_FIELDS,),
    "trajectory": (TASK_FIELDS, TRAJECTORY_FIELDS),
    "judged": (TASK_FIELDS, TRAJECTORY_FIELDS, JUDGED_FIELDS),
    "scored": (TASK_FIELDS, TRAJECTORY_FIELDS, JUDGED_FIELDS, SCORED_FIELDS),
}


def upgrade(record: dict, where=None) -> dict:
    """Bring an older record to SCHEMA_VERSION; refuse records from a newer mars."""
    v = record.get("schema_version", SCHEMA_VERSION)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise _err(where, f"schema_version must be a positive integer, got {v!r}")
    if v > SCHEMA_VERSION:
        raise _err(where, f"schema_version {v} is newer than this mars reads ({SCHEMA_VERSION}): upgrade mars")
    # Version 1 is the first: nothing to upgrade yet. Later versions add steps here.
    return record


def validate(record: dict, kind: str, where=None, *, only: tuple[str, ...] | None = None) -> dict:
    """Check `record` carries what a `kind` record must; raise a located error if not.

    `only` restricts the check to the named fields (a stage checks what it reads).
    Returns the record (upgraded) so a stage can write `rec = validate(rec, ...)`.
    """
    if kind not in _BY_KIND:
        raise ValueError(f"unknown record kind {kind!r}")
    record = upgrade(record, where)
    for table in _BY_KIND[kind]:
        for name, (check, desc, required) in table.items():
            if only is not None and name not in only:
                continue
            if name not in record:
                if required:
                    raise _err(where, f"missing field '{name}' (a {kind} record needs it)")
                continue
            if not check(record[name]):
                got = record[name]
                shown = repr(got) if len(repr(got)) < 60 else type(got).__name__
                raise _err(where, f"field '{name}' must be {desc}, got {shown}")
    return record


class DuplicateCheck:
    """Refuses a second trajectory with the same (group, sample): it would count twice."""

    def __init__(self) -> None:
        self.seen: dict[tuple, object] = {}

    def __call__(self, rec: dict, where) -> None:
        key = (rec.get("group"), rec.get("sample"))
        if key[0] is None or key[1] is None:
            return
        validate(rec, "trajectory", where, only=("group", "sample"))  # a key must be a string/integer, not [] or {}
        key = (str(key[0]), key[1])
        first = self.seen.setdefault(key, where)
        if first is not where:
            raise where.error(f"duplicate trajectory: group {key[0]!r} sample {key[1]} was already read at {first}; "
                              "a batch must hold each trajectory once (was a file passed twice?)")


def warn_duplicate_tasks(located):
    """Pass (where, task) pairs through, warning when a task id was already read: its
    episodes would share a group (and a sample number) with the first one's."""
    from mars_cli import streams

    seen: dict[str, object] = {}
    for where, rec in located:
        tid = rec.get("id")
        if isinstance(tid, (str, int)) and not isinstance(tid, bool):
            first = seen.setdefault(str(tid), where)
            if first is not where:
                streams.warn(f"{where}: task id {tid!r} was already read at {first}; its episodes will repeat "
                             "(group, sample) pairs, which advantage and update refuse")
        yield where, rec


def _err(where, message: str) -> MarsError:
    if where is None:
        return MarsError(message)
    if hasattr(where, "error"):
        return where.error(message)
    return RecordError(str(where), None, message)


def task_view(record: dict) -> dict:
    """The task fields of a record with defaults filled in (never mutates it)."""
    return {
        "id": record["id"],
        "question": record["question"],
        "images": list(record.get("images") or []),
        "answers": list(record.get("answers") or []),
        "choices": record.get("choices"),
        "benchmark": record.get("benchmark", "unknown"),
        "scorer": record.get("scorer"),
        "meta": record.get("meta") or {},
    }


def make_task(
    id: str,
    question: str,
    *,
    images: list[str] | None = None,
    answers: list[str] | None = None,
    choices: list[str] | None = None,
    benchmark: str = "custom",
    scorer: str = "llm",
    meta: dict | None = None,
) -> dict:
    """A task record in the canonical field order."""
    rec = {
        "schema_version": SCHEMA_VERSION,
        "id": id,
        "question": question,
        "images": images or [],
        "answers": answers or [],
        "choices": choices,
        "benchmark": benchmark,
        "scorer": scorer,
        "meta": meta or {},
    }
    validate(rec, "task")
    return rec
