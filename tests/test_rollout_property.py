"""Property: whatever text the engine returns, the loop ends each episode with a valid, consistent record."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers_rollout import FakeImageSearch, FakeTextSearch, ScriptedEngine, make_image, turn_script
from mars_cli.agent.check import check_trajectory
from mars_cli.agent.loop import AgentLoop, Limits
from mars_cli.agent.toolbox import Toolbox
from mars_cli.records import FINISH_REASONS, make_task, validate

PIECES = [
    "<thinking>", "</thinking>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>",
    '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 500, 500]}}',
    '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 10, 900, 990], "img_idx": 1}}',
    '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 0.4, 2000]}}',
    '{"name": "text_search_tool", "arguments": {"query": "red sign"}}',
    '{"name": "text_search_tool", "arguments": "{\\"query\\": \\"zzz\\"}"}',
    '{"name": "image_search_tool", "arguments": {"img_idx": 2}}', '{"name": "image_search_tool"}',
    '{"name": "nope", "arguments": {}}', "```json\n", "```", "{", "}", "[1, 2]", "null", "\n", " ",
]
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
turn = st.lists(st.one_of(text, st.sampled_from(PIECES)), max_size=8).map("".join)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("prop")
    img = make_image(d / "a.jpg", size=(300, 200))
    thumb = make_image(d / "t.jpg", size=(40, 40))
    tb = Toolbox(d / "art", text_search=FakeTextSearch({"Sign": "a red sign"}),
                 image_search=FakeImageSearch([("thing", thumb)]))
    return img, tb


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(turn, min_size=1, max_size=4), max_new=st.integers(1, 120), budget=st.integers(200, 4000))
def test_loop_never_crashes(world, turns, max_new, budget):
    img, tb = world
    eng = ScriptedEngine(turn_script(turns), image_cost=30)
    loop = AgentLoop(eng, tb, limits=Limits(max_turns=3, max_new_tokens=max_new, max_total_tokens=budget))
    recs = list(loop.run([make_task("t", "what?", images=[img])], n=2))
    assert len(recs) == 2
    for rec in recs:
        validate(rec, "trajectory")
        assert rec["finish"] in FINISH_REASONS
        # the only error: a first prompt over the budget, said plainly (never run silently cut)
        assert rec["finish"] != "error" or "the first prompt needs" in rec["error"]
        assert (rec["prediction"] is not None) == (rec["finish"] == "answer")
        assert rec["turns"] <= 3 and len(rec["tool_calls"]) <= rec["turns"]
        assert check_trajectory(rec, eng.renderer) == []
        json.dumps(rec, allow_nan=False)
