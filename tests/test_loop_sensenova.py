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
