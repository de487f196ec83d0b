"""Property tests: parse_turn and the JSONL reader never fail in a way the pipeline can't record."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mars_cli import protocol
from mars_cli.errors import MarsError
from mars_cli.jsonl import RecordWriter, dumps, read_located

TAGS = ["<thinking>", "</thinking>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>",
        "```json\n", "```", "{", "}", "[", "]", '"', ":", ",", "NaN", "Infinity", "-Infinity", "1e999",
        "123456789012345678901234567890", '"\\ud800"', '"\\udfff"', "\ud800", "null", "\n",
        '{"name": "image_zoom_in_tool", "arguments": ', '{"name": "text_search_tool", "arguments": ',
        '{"name": "image_search_tool", "arguments": ', '{"bbox_2d": [0, 0, 500, 500], "img_idx": ',
        '{"query": ', '"arguments": "{\\"query\\": 1e999}"']
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3), max_leaves=12)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


turn_text = st.one_of(
    st.lists(st.one_of(st.text(max_size=12), st.sampled_from(TAGS)), max_size=12).map("".join),
    st.tuples(st.integers(0, 6000), st.sampled_from(["[", '{"a":'])).map(lambda t: "<tool_call>" + t[1] * t[0] + "</tool_call>"),
    json_values.map(lambda v: "<tool_call>" + json.dumps({"name": "text_search_tool", "arguments": {"query": "q", "x": v}})
                    + "</tool_call>"),
)


def _assert_writable(turn: protocol.Turn) -> None:
    # Everything a turn hands the loop must go into a record unchanged.
    dumps({"thinking": turn.thinking, "answer": turn.answer, "error": turn.error, "raw": turn.raw_call,
           "call": None if turn.call is None else {"name": turn.call.name, "arguments": turn.call.arguments}})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turn_text)
def test_parse_turn_never_raises_and_yields_writable_values(text):
    turn = protocol.parse_turn(text)
    assert turn.action in ("answer", "call", "error", "none")
    _assert_writable(turn)
    if turn.call is not None:
        assert turn.call.name in protocol.TOOL_NAMES and isinstance(turn.call.arguments, dict)


@pytest.mark.parametrize("depth", [10, 40, 300, 1000, 5000, 100_000])
def test_parse_turn_deep_nesting_at_any_depth(depth):
    for body in (_nested(depth), '{"name": "text_search_tool", "arguments": {"query": "q", "x": ' + _nested(depth) + "}}"):
        turn = protocol.parse_turn(f"<tool_call>{body}</tool_call>")
        _assert_writable(turn)
        assert turn.call is None if depth > protocol.MAX_ARGUMENT_DEPTH else True


line = st.one_of(
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    json_values.map(lambda v: json.dumps({"a": v}, allow_nan=True)),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.integers(0, 1100).map(lambda d: '{"x": ' + _nested(d) + "}"),
    st.sampled_from(['{"a": "\\ud800"}', '{"a": NaN}', '{"a": 1e400}', '{"a": 123456789012345678901234567890}', "{", '"s"',
                     "\ufeff{}", "   ", '{"a": 1} trailing']),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(line, max_size=6), st.booleans())
def test_jsonl_reader_yields_objects_or_a_located_error_and_what_it_yields_can_be_written(tmp_path, lines, final_newline):
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(lines) + ("\n" if final_newline else "")).encode("utf-8", "surrogatepass"))
    try:
        got = list(read_located([path]))
    except MarsError as e:
        assert str(e).startswith(f"{path}:")  # file:line, never a traceback
        return
    out = tmp_path / "out.jsonl"
    with RecordWriter(out) as w:
        for where, rec in got:
            assert isinstance(rec, dict) and str(where).startswith(f"{path}:")
            w.write(rec)
    assert [orjson.loads(x) for x in out.read_bytes().splitlines()] == [{"schema_version": 1, **r} if "schema_version" not in r else r
                                                                       for _, r in got]
