"""Strict JSON for model output and request bodies: only values a JSONL record can hold.

A model's tool call is parsed with these rules so that whatever is accepted can be
written to a record unchanged (orjson refuses NaN/Infinity, integers beyond 64 bits,
unpaired surrogates and deep nesting, and would end the whole rollout on them):

- NaN, Infinity and numbers that overflow a double are refused;
- integers must fit in 64 bits (signed or unsigned), checked before conversion;
- nesting is bounded (MAX_DEPTH, far below the writer's 254 and Python's recursion limit);
- strings must be valid Unicode (no unpaired surrogate such as \\ud800).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # nesting of a call's JSON; records hold it a few levels deeper


class Unwritable(ValueError):
    """A JSON value that parses but that a record cannot hold."""


def _reject_constant(name: str):
    raise Unwritable(f"{name} is not a JSON number")


def _finite_float(s: str) -> float:
    v = float(s)
    if v != v or v in (float("inf"), float("-inf")):
        raise Unwritable(f"the number {s[:20]} is out of range")
    return v


def _int64(s: str) -> int:
    if len(s) > 20 or not -(1 << 63) <= int(s) < (1 << 64):
        raise Unwritable(f"the integer {s[:24]}{'…' if len(s) > 24 else ''} does not fit in 64 bits")
    return int(s)


def writable_problem(value: Any, max_depth: int = MAX_DEPTH) -> str | None:
    """Why `value` cannot go into a record (too deep, a lone surrogate, …), or None."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > max_depth:
                return f"it is nested more than {max_depth} levels deep"
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str):
                    stack.append((k, depth))
                stack.append((x, depth + 1))
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "it contains an unpaired surrogate (\\ud800-\\udfff) in a string"
    return None


def loads_json(body: str) -> Any:
    """Strict JSON for model output: only values a record can hold (no NaN/Infinity, 64-bit
    integers, bounded nesting, valid Unicode); anything else raises ValueError."""
    try:
        obj = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_int64)
    except RecursionError:
        raise Unwritable(f"it is nested more than {MAX_DEPTH} levels deep") from None
    problem = writable_problem(obj)
    if problem:
        raise Unwritable(problem)
    return obj


REQUEST_DEPTH = 64  # nesting of a request body (mars serve, the retriever server)


def loads_request(body: bytes | str, max_depth: int = REQUEST_DEPTH) -> Any:
    """A request body's JSON with loads_json's rules (no NaN/Infinity, no overflowing
    number, 64-bit integers, valid Unicode) and nesting bounded by `max_depth`: a
    ValueError with one line for anything else, never a RecursionError."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Unwritable(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    # The nesting is bounded before parsing: the parser's recursion is not reached.
    depth = deepest = 0
    for m in _BRACKETS.finditer(body):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > max_depth:
                raise Unwritable(f"it is nested more than {max_depth} levels deep")
        elif c in "]}":
            depth -= 1
    try:
        obj = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_int64)
    except RecursionError:
        raise Unwritable(f"it is nested more than {max_depth} levels deep") from None
    problem = writable_problem(obj, max_depth)
    if problem:
        raise Unwritable(problem)
    return obj


# brackets outside strings ("..." skipped whole, escapes included)
_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with unpaired surrogates (which no UTF-8 record can hold) replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)
