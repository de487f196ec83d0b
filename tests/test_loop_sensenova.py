"""The loop under the sensenova profile: what ends an episode, what the model is told."""

from __future__ import annotations

from helpers_rollout import ScriptedEngine, answer, call, make_image, turn_script
from mars_cli.agent.loop import AgentLoop
from mars_cli.agent.toolbox import Toolbox
from mars_cli.records import make_task


def test_only_unreadable_turns_end_the_episode(tmp_path):
    img = make_image(tmp_path / "a.jpg", size=(300, 200))
    t = make_task("t", "q?", images=[img])
    unknown = call("draw_tool", x=1)
    bad_box = call("image_zoom_in_tool", bbox_2d=[0, 0, 1500, 10], label="x", img_idx=0)
    eng = ScriptedEngine(turn_script([unknown, bad_box, answer("a")]))
    [rec] = AgentLoop(eng, Toolbox(tmp_path / "art"), on_malformed="end").run([t])
    assert rec["finish"] == "answer" and rec["turns"] == 3
    results = [m["content"][0]["text"] for m in rec["messages"] if m["role"] == "tool"]
    assert results == ["Error: Unknown tool 'draw_tool'",
                       "Error: In relative mode, coordinates must be in [0, 1000.0]. Got: [0, 0, 1500, 10]"]
    assert [c["ok"] for c in rec["tool_calls"]] == [False, False]
    for unreadable in ('<tool_call>{"name": "image_zoom_in_tool", </tool_call>', "<answer> </answer>"):
        [rec] = AgentLoop(ScriptedEngine(turn_script([unreadable, answer("a")])), Toolbox(tmp_path / "art"),
                          on_malformed="end").run([t])
        assert rec["finish"] == "malformed" and rec["turns"] == 1


def test_extra_calls_get_no_note_under_sensenova(tmp_path):
    img = make_image(tmp_path / "a.jpg", size=(300, 200))
    two = call("image_zoom_in_tool", bbox_2d=[0, 0, 500, 500], label="x", img_idx=0) * 2
    eng = ScriptedEngine(turn_script([two, answer("a")]))
    [rec] = AgentLoop(eng, Toolbox(tmp_path / "art")).run([make_task("t", "q?", images=[img])])
    tool = [m for m in rec["messages"] if m["role"] == "tool"][0]
    assert tool["content"][0]["text"] == "Here is the zoomed image:" and len(tool["content"]) == 2


def test_the_eval_profile_has_no_budget_an_episode_runs_past_32k_tokens(tmp_path):
    """eval.py has no prompt or response budget (only 50 turns of 4,096 tokens): ten long turns,
    over 35,000 generated tokens, end in an answer; the training profile's 16,384-token
    response budget ends the same episode early."""
    import dataclasses
    import json

    from mars_cli import sensenova
    from mars_cli.agent.loop import Limits
    from mars_cli.protocol import get_profile

    long_call = (f"<thinking>{'x' * 3900}</thinking>\n<tool_call>\n"
                 + json.dumps({"name": "draw_tool", "arguments": {}}) + "\n</tool_call>")
    script = turn_script([long_call] * 9 + ["<thinking>done</thinking>\n<answer>a</answer>"])
    t = make_task("t", "q?", answers=["a"], meta={"system_prompt": sensenova.SYSTEM_PROMPT})
    official = Limits(**{**dataclasses.asdict(Limits()), **get_profile("sensenova-eval").limits})
    assert (official.max_turns, official.max_new_tokens, official.max_prompt_tokens, official.max_response_tokens) \
        == (50, 4096, None, None)
    [rec] = AgentLoop(ScriptedEngine(script), Toolbox(tmp_path / "art", profile="sensenova-eval"), limits=official,
                      profile="sensenova-eval").run([t])
    generated = sum(rec["tokens"]["mask"])
    assert rec["finish"] == "answer" and rec["turns"] == 10 and generated > 35_000, (rec["finish"], generated)
    assert rec["messages"][3]["content"] == [{"type": "text", "text": "Error: Unknown tool 'draw_tool'."}]
    [rec] = AgentLoop(ScriptedEngine(script), Toolbox(tmp_path / "art"), profile="sensenova").run([t])
    assert rec["finish"] == "max_tokens" and rec["turns"] < 10 and sum(rec["tokens"]["mask"]) <= 16384
