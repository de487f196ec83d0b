"""The agent loop against a scripted engine: every tool path, limit and finish reason."""

from __future__ import annotations

import json

import pytest

from mars_cli import protocol
from mars_cli.agent.loop import AgentLoop, Limits
from mars_cli.agent.toolbox import Toolbox
from mars_cli.records import make_task, validate
from helpers_rollout import (SPECIAL, FakeImageSearch, FakeTextSearch, ScriptedEngine, answer, call,
                                   make_image, turn_script)


@pytest.fixture
def img(tmp_path):
    return make_image(tmp_path / "photo.jpg", size=(800, 600))


def task(img, i="t1", q="What is written on the sign?"):
    return make_task(i, q, images=[img], answers=["stop"], benchmark="test", scorer="em")


def run(engine, tasks, tmp_path, n=1, limits=None, text=None, image=None, **kw):
    # the loop's mechanics under the mars profile: crops from the source, malformed calls observed
    tb = Toolbox(tmp_path / "artifacts", text_search=text, image_search=image, profile="mars")
    kw.setdefault("on_malformed", "observe")
    return list(AgentLoop(engine, tb, limits=limits or Limits(max_total_tokens=100_000), **kw).run(tasks, n=n))


def rebuild(rec, engine):
    """ids from the messages: initial prompt, then each turn's generated ids + continuation."""
    r = engine.renderer
    first = next(i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant")
    ids, _, _ = r.render(rec["messages"][:first])
    toks = rec["tokens"]
    runs, cur = [], []
    for t, m in zip(toks["ids"], toks["mask"]):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    msgs = rec["messages"][first:]
    k = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        gen = runs[k]
        k += 1
        ids += gen
        tail = []
        for m2 in msgs[i + 1:]:
            if m2["role"] == "assistant":
                break
            tail.append(m2)
        if tail:
            ids += r.continuation(tail, ended_with_eos=gen[-1] == SPECIAL["im_end"])[0]
    return ids


def test_zoom_then_answer_record_and_tokens(img, tmp_path):
    eng = ScriptedEngine(turn_script([call(protocol.ZOOM, bbox_2d=[100, 100, 600, 500], label="sign"), answer("stop")]))
    [rec] = run(eng, [task(img)], tmp_path)
    validate(rec, "trajectory")
    assert rec["finish"] == "answer" and rec["prediction"] == "stop" and rec["turns"] == 2
    assert rec["group"] == "t1" and rec["sample"] == 0 and rec["question"] == "What is written on the sign?"
    [tc] = rec["tool_calls"]
    assert tc["name"] == protocol.ZOOM and tc["ok"] and tc["error"] is None and tc["latency"] >= 0
    crop = rec["messages"][3]["content"][1]["image"]
    assert crop.startswith(str(tmp_path / "artifacts"))
    toks = rec["tokens"]
    assert len(toks["ids"]) == len(toks["mask"]) == len(toks["logprobs"])
    assert toks["images"] == [img, crop] == protocol.message_images(rec["messages"])
    assert toks["ids"].count(SPECIAL["image_pad"]) == 2  # one placeholder per image
    assert all(lp == 0.0 for lp, m in zip(toks["logprobs"], toks["mask"]) if m == 0)
    assert all(lp == -0.5 for lp, m in zip(toks["logprobs"], toks["mask"]) if m == 1)
    assert toks["ids"] == rebuild(rec, eng)
    # ids equal rendering the finished conversation (no generation prompt after the end)
    full, mask, _ = eng.renderer.render(rec["messages"], add_generation_prompt=False)
    assert full[: len(toks["ids"])] == toks["ids"]
    assert mask[: len(toks["mask"])] == toks["mask"]
    assert rec["policy"]["engine"] == "scripted" and rec["policy"]["trainable"] is True
    json.dumps(rec)


def test_crop_of_crop_is_cut_from_original(img, tmp_path):
    from PIL import Image

    eng = ScriptedEngine(turn_script([
        call(protocol.ZOOM, bbox_2d=[500, 500, 1000, 1000]),
        call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500], img_idx=1),
        answer("x")]))
    [rec] = run(eng, [task(img)], tmp_path)
    first, second = (m["content"][1]["image"] for m in rec["messages"] if m["role"] == "tool")
    # the second box, relative to the first crop (the lower-right quarter), is the
    # quarter of the original from (0.5, 0.5) to (0.75, 0.75): 200×150 pixels of 800×600
    assert Image.open(second).size == (200, 150)
    assert Image.open(first).size == (400, 300)


def test_text_search_and_image_search_paths(img, tmp_path):
    pytest.importorskip("mars_cli.tools.image_search")
    thumb = make_image(tmp_path / "thumb.jpg", size=(64, 64))
    text = FakeTextSearch({"Stop sign": "A stop sign is a red octagon.", "Tree": "A tall plant."})
    image = FakeImageSearch([("A red sign", thumb)])
    eng = ScriptedEngine(turn_script([call(protocol.IMAGE_SEARCH), call(protocol.TEXT_SEARCH, query="red octagon sign"),
                                      answer("stop")]))
    [rec] = run(eng, [task(img)], tmp_path, text=text, image=image)
    assert [t["ok"] for t in rec["tool_calls"]] == [True, True]
    assert image.seen == [img] and text.queries == ["red octagon sign"]
    tools = [m for m in rec["messages"] if m["role"] == "tool"]
    assert thumb in protocol.message_images([tools[0]])
    assert "stop sign" in tools[1]["content"][0]["text"].lower()
    assert rec["tokens"]["images"] == [img, thumb]
    assert rec["tokens"]["ids"] == rebuild(rec, eng)


def test_tool_error_and_malformed_calls_go_on(img, tmp_path):
    eng = ScriptedEngine(turn_script([
        call(protocol.TEXT_SEARCH, query="anything"),  # no backend configured: ToolError
        "<thinking>t</thinking><tool_call>{not json</tool_call>",
        '<thinking>t</thinking><tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [5, 5, 1, 1]}}</tool_call>',
        call(protocol.ZOOM, bbox_2d=[0, 0, 10, 10], img_idx=7),
        answer("stop")]))
    [rec] = run(eng, [task(img)], tmp_path)
    assert rec["finish"] == "answer" and rec["turns"] == 5
    assert [t["ok"] for t in rec["tool_calls"]] == [False] * 4
    assert rec["tool_calls"][1]["name"] is None and "not valid JSON" in rec["tool_calls"][1]["error"]
    assert rec["tool_calls"][2]["name"] == protocol.ZOOM and rec["tool_calls"][2]["arguments"] == {"bbox_2d": [5, 5, 1, 1]}
    assert "out of range" in rec["tool_calls"][3]["error"]
    errors = [m["content"][0]["text"] for m in rec["messages"] if m["role"] == "tool"]
    assert all(e.startswith("Error: ") for e in errors) and "not available" in errors[0]
    assert rec["tokens"]["ids"] == rebuild(rec, eng)


def test_extra_calls_note(img, tmp_path):
    two = call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500]) + "\n" + protocol.format_call(protocol.ZOOM, {"bbox_2d": [1, 1, 2, 2]})
    eng = ScriptedEngine(turn_script([two, answer("a")]))
    [rec] = run(eng, [task(img)], tmp_path)
    assert len(rec["tool_calls"]) == 1
    assert "1 more call was ignored" in rec["messages"][3]["content"][0]["text"]


@pytest.mark.parametrize("turns,limits,finish", [
    ([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500])], Limits(max_turns=3, max_total_tokens=100_000), "max_turns"),
    (["<thinking>hmm</thinking> nothing to do"], Limits(max_total_tokens=100_000), "no_action"),
    (["<thinking>" + "x" * 500 + "</thinking>"], Limits(max_new_tokens=50, max_total_tokens=100_000), "max_tokens"),
])
def test_finish_reasons(img, tmp_path, turns, limits, finish):
    eng = ScriptedEngine(turn_script(turns))
    [rec] = run(eng, [task(img)], tmp_path, limits=limits)
    assert rec["finish"] == finish and rec["prediction"] is None
    if finish == "max_turns":
        assert rec["turns"] == 3 and len(rec["tool_calls"]) == 2  # the last call is not run
        assert rec["messages"][-1]["role"] == "assistant"
    if finish == "max_tokens":
        assert rec["tokens"]["mask"].count(1) == 50
    assert rec["tokens"]["ids"] == rebuild(rec, eng)


def test_total_budget_counts_image_tokens(img, tmp_path):
    eng = ScriptedEngine(turn_script([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500]), answer("a")]), image_cost=400)
    prompt = len(eng.renderer.render(protocol.initial_messages(task(img)))[0]) - 1 + 400
    # room for the first turn but not for the zoomed image's 400 tokens
    [rec] = run(eng, [task(img)], tmp_path, limits=Limits(max_total_tokens=prompt + 300))
    assert rec["finish"] == "max_tokens" and rec["turns"] == 1 and rec["tool_calls"][0]["ok"]
    assert rec["messages"][-1]["role"] == "assistant" and rec["tokens"]["ids"] == rebuild(rec, eng)
    # a prompt that alone exceeds the budget never reaches the engine, and says why (never silent)
    calls = eng.calls
    [rec] = run(eng, [task(img)], tmp_path, limits=Limits(max_total_tokens=prompt))
    assert rec["finish"] == "error" and rec["turns"] == 0 and eng.calls == calls
    assert f"needs {prompt} tokens" in rec["error"] and "--max-total-tokens" in rec["error"]


def test_engine_failure_is_isolated_to_its_episode(img, tmp_path):
    eng = ScriptedEngine(turn_script([answer("a")]), fail_when=lambda msgs: "bad" in msgs[1]["content"][-1]["text"])
    recs = run(eng, [task(img, "ok1"), task(img, "bad", q="bad question"), task(img, "ok2")], tmp_path)
    by = {r["group"]: r for r in recs}
    assert by["bad"]["finish"] == "error" and "scripted engine failure" in by["bad"]["error"]
    assert by["ok1"]["finish"] == by["ok2"]["finish"] == "answer"


def test_batched_groups_and_refill(img, tmp_path):
    # Episodes of different lengths: short ones finish first and are replaced from the input.
    def script(msgs):
        n = sum(m["role"] == "assistant" for m in msgs)
        want = int(msgs[1]["content"][-1]["text"].split()[-1])
        return answer("done") if n >= want else call(protocol.ZOOM, bbox_2d=[0, 0, 900, 900])
    eng = ScriptedEngine(script)
    tasks = [task(img, f"t{i}", q=f"turns {i % 3}") for i in range(6)]
    recs = run(eng, tasks, tmp_path, n=3, max_inflight=4)
    assert len(recs) == 18
    assert sorted((r["group"], r["sample"]) for r in recs) == sorted((f"t{i}", s) for i in range(6) for s in range(3))
    assert all(r["finish"] == "answer" for r in recs)
    assert 3 <= max(eng.batch_sizes) <= 4  # never more than --max-inflight; a group's samples start together
    # episodes share generate calls (no lock-step: one whose tool is back does not wait for the others)
    assert eng.calls < sum(r["turns"] for r in recs)


def test_interrupted_run_keeps_finished_episodes(img, tmp_path, monkeypatch):
    from mars_cli.agent import run as runner

    def script(msgs):
        if "slow" in msgs[1]["content"][-1]["text"]:
            return call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500])
        return answer("a")

    eng = ScriptedEngine(script)
    real_generate = eng.generate

    def generate(reqs):
        if eng.calls >= 2:
            raise KeyboardInterrupt
        return real_generate(reqs)

    eng.generate = generate
    monkeypatch.setattr(runner, "make_engine", lambda **kw: eng)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(task(img, "fast")) + "\n" + json.dumps(task(img, "slow", q="slow one")) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        runner.rollout([str(tasks)], out=str(out), n=1, engine={"name": "x", "policy": None}, sampling={}, limits={},
                       tools={})
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["group"] for r in recs] == ["fast"]
    # --resume runs only what is missing and keeps what was there
    eng.generate = real_generate
    runner.rollout([str(tasks)], out=str(out), n=1, resume=True, engine={"name": "x", "policy": None}, sampling={},
                   limits={"max_turns": 2}, tools={})
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["group"], r["finish"]) for r in recs] == [("fast", "answer"), ("slow", "max_turns")]


@pytest.mark.parametrize("args,msg", [(["--resume"], "--resume needs -o"), (["-n", "0"], "-n must be at least 1"),
                                      (["--check"], "--check needs --policy"), (["--top-p", "0"], "--top-p")])
def test_rollout_usage_errors(args, msg):
    from typer.testing import CliRunner

    from mars_cli.main import app

    r = CliRunner().invoke(app, ["rollout", *args], input="")
    assert r.exit_code == 2 and msg in r.stderr
