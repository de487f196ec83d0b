"""The asynchronous loop: independent episodes, remote-engine failures, image cap, weight
versions, budgets, workflows, and `mars rollout`'s output, input errors and exit rules."""

from __future__ import annotations

import asyncio
import json

import pytest

from clirun import Ran
from helpers_rollout import FakeImageSearch, FakeTextSearch, ScriptedEngine, answer, call, make_image, turn_script
from mars_cli import protocol
from mars_cli.agent.loop import AgentLoop, Limits
from mars_cli.agent.toolbox import Toolbox
from mars_cli.engines import GenResult
from mars_cli.errors import MarsError
from mars_cli.records import make_task, validate


class AsyncEngine(ScriptedEngine):
    """A remote-style engine: `agenerate` awaits (no thread), per-result weight versions."""

    def __init__(self, script, *, version=None, fail=None, die=None, max_images=None, **kw):
        super().__init__(script, **kw)
        self.version = version or (lambda: 3)
        self.fail = fail  # messages -> error text for that request
        self.die = die  # messages -> True: the engine is gone
        self.max_images = max_images
        self.seen_images: list[int] = []
        self.weight_version = self.version()

    async def agenerate(self, req):
        await asyncio.sleep(0.001)
        self.seen_images.append(len(req.images))
        if self.die is not None and self.die(req.messages):
            raise MarsError("no policy server left: http://127.0.0.1:1: connection refused")
        if self.fail is not None and self.fail(req.messages):
            return GenResult(text="", error="http://127.0.0.1:1: 500 internal error")
        [res] = self.generate([req])
        res.weight_version = self.version()
        res.fingerprint = f"fp-{res.weight_version}"
        return res


@pytest.fixture
def img(tmp_path):
    return make_image(tmp_path / "photo.jpg", size=(800, 600))


def task(img, i="t1", q="What is written on the sign?"):
    return make_task(i, q, images=[img], answers=["stop"], benchmark="test", scorer="em")


def question(msgs):
    return msgs[1]["content"][-1]["text"]


def test_episodes_do_not_wait_for_each_others_tools(img, tmp_path):
    # "slow" makes one search that takes 1 s; "fast" makes three instant ones. In lock-step
    # the fast episode would wait for the slow search at its second turn and finish last.
    def script(msgs):
        k = sum(m["role"] == "assistant" for m in msgs)
        if "slow" in question(msgs):
            return call(protocol.TEXT_SEARCH, query="slow red sign") if k == 0 else answer("a")
        return call(protocol.TEXT_SEARCH, query="red sign") if k < 3 else answer("b")

    class Search(FakeTextSearch):
        def search(self, query, k=5):
            self.latency = 1.0 if "slow" in query else 0.0
            return super().search(query, k)

    tb = Toolbox(tmp_path / "art", text_search=Search({"Sign": "a red sign"}))
    order = []
    loop = AgentLoop(AsyncEngine(script), tb, max_inflight=2)
    loop.run_sync(loop.arun([task(img, "slow", q="slow"), task(img, "fast", q="fast")], emit=order.append))
    assert [r["group"] for r in order] == ["fast", "slow"]
    assert order[0]["turns"] == 4 and order[0]["finish"] == order[1]["finish"] == "answer"


def test_failed_request_fails_its_episode_and_weight_versions_are_recorded(img, tmp_path):
    versions = iter(range(10, 100))
    eng = AsyncEngine(turn_script([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500]), answer("a")]),
                      version=lambda: next(versions), fail=lambda m: "bad" in question(m))
    tb = Toolbox(tmp_path / "art")
    recs = AgentLoop(eng, tb).run([task(img, "ok"), task(img, "bad", q="bad one")])
    by = {r["group"]: r for r in recs}
    assert by["bad"]["finish"] == "error" and "500 internal error" in by["bad"]["error"]
    ok = by["ok"]
    assert ok["finish"] == "answer"
    v = ok["policy"]["weight_versions"]
    assert len(v) == 2 and v[0] < v[1] and ok["policy"]["weight_version"] == v[0]
    assert ok["policy"]["fingerprint"] == f"fp-{v[0]}"  # the checkpoint that sampled its oldest turn
    validate(ok, "trajectory")


def test_lost_engine_stops_new_episodes_and_raises(img, tmp_path):
    eng = AsyncEngine(turn_script([answer("a")]), die=lambda m: "dead" in question(m))
    got = []
    loop = AgentLoop(eng, Toolbox(tmp_path / "art"), max_inflight=1)
    tasks = [task(img, "a"), task(img, "dead", q="dead"), task(img, "never")]
    with pytest.raises(MarsError, match="no policy server left"):
        loop.run_sync(loop.arun(tasks, emit=got.append))
    assert [(r["group"], r["finish"]) for r in got] == [("a", "answer"), ("dead", "error")]


def test_image_cap_tells_the_model_and_never_sends_more(img, tmp_path):
    thumbs = [make_image(tmp_path / f"th{i}.jpg", size=(40, 40)) for i in range(3)]
    eng = AsyncEngine(turn_script([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500]), call(protocol.IMAGE_SEARCH),
                                   answer("a")]), max_images=2)
    tb = Toolbox(tmp_path / "art", image_search=FakeImageSearch([(f"t{i}", p) for i, p in enumerate(thumbs)]))
    [rec] = AgentLoop(eng, tb).run([task(img)])
    assert rec["finish"] == "answer" and max(eng.seen_images) == 2
    search_result = rec["messages"][5]
    assert not [p for p in search_result["content"] if p["type"] == "image"]
    assert "3 images were left out" in search_result["content"][-1]["text"]
    assert rec["tool_calls"][1]["images_dropped"] == 3
    # a task that alone holds more images than the cap never reaches the engine
    eng.max_images = 0
    [rec] = AgentLoop(eng, tb).run([task(img)])
    assert rec["finish"] == "error" and "at most 0" in rec["error"]


def test_prompt_and_response_budgets(img, tmp_path):
    eng = ScriptedEngine(turn_script([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500]), answer("a")]), image_cost=400)
    tb = Toolbox(tmp_path / "art")
    prompt = len(eng.renderer.render(protocol.initial_messages(task(img)))[0]) - 1 + 400
    [rec] = AgentLoop(eng, tb, limits=Limits(max_prompt_tokens=prompt - 1)).run([task(img)])
    assert rec["finish"] == "error" and f"needs {prompt} tokens" in rec["error"] and "--max-prompt-tokens" in rec["error"]
    # the prompt fits exactly; the zoomed image (400 tokens) counts against the response budget
    [rec] = AgentLoop(eng, tb, limits=Limits(max_prompt_tokens=prompt, max_response_tokens=300)).run([task(img)])
    assert rec["finish"] == "max_tokens" and rec["turns"] == 1
    [rec] = AgentLoop(eng, tb, limits=Limits(max_prompt_tokens=prompt, max_response_tokens=1000)).run([task(img)])
    assert rec["finish"] == "answer"
    gen = rec["tokens"]["mask"].count(1)
    assert len(rec["tokens"]["ids"]) - 1 + 800 - gen > prompt  # the tool result's template + image were counted


def test_on_malformed_end_and_observe(img, tmp_path):
    bad = "<thinking>x</thinking><tool_call>{not json</tool_call>"
    eng = ScriptedEngine(turn_script([bad, answer("a")]))
    tb = Toolbox(tmp_path / "art")
    [rec] = AgentLoop(eng, tb, on_malformed="end").run([task(img)])
    assert rec["finish"] == "malformed" and rec["turns"] == 1 and rec["tool_calls"][0]["ok"] is False
    validate(rec, "trajectory")
    [rec] = AgentLoop(eng, tb, on_malformed="observe").run([task(img)])
    assert rec["finish"] == "answer" and rec["turns"] == 2


def test_workflows_direct_and_rag(img, tmp_path):
    seen = []

    def script(msgs):
        seen.append(msgs)
        return call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500])

    tb = Toolbox(tmp_path / "art", text_search=FakeTextSearch({"Stop sign": "a red octagon sign says stop"}))
    [rec] = AgentLoop(ScriptedEngine(script), tb, workflow="direct").run([task(img)])
    assert rec["turns"] == 1 and rec["finish"] == "max_turns" and rec["workflow"] == "direct"
    assert "<tools>" not in seen[-1][0]["content"] and "<answer>" in seen[-1][0]["content"]
    eng = ScriptedEngine(turn_script([answer("stop")]))
    [rec] = AgentLoop(eng, tb, workflow="rag").run([task(img, q="What does the red sign say")])
    assert rec["finish"] == "answer" and rec["rag"]["text"]["titles"] == ["Stop sign"] and rec["tool_calls"] == []
    text = rec["messages"][1]["content"][-1]["text"]
    assert text.index("red octagon") < text.rindex("What does the red sign say") and text.endswith("say")


def test_tool_calls_record_infra(img, tmp_path):
    # a zoom into an image that is not there is the model's fault; a search backend that is off is not
    eng = ScriptedEngine(turn_script([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500], label="x", img_idx=7),
                                      call(protocol.TEXT_SEARCH, query="x"), answer("a")]))
    [rec] = AgentLoop(eng, Toolbox(tmp_path / "art"), on_malformed="observe").run([task(img)])
    assert [(c["ok"], c["infra"]) for c in rec["tool_calls"]] == [(False, False), (False, True)]


# --- the command: output, input errors, exit rules ---------------------------------------------


def _cli(monkeypatch, eng, args, tasks_text, tmp_path, input_=None):
    from mars_cli.agent import run as runner

    monkeypatch.setattr(runner, "make_engine", lambda **kw: eng)
    f = tmp_path / "tasks.jsonl"
    f.write_text(tasks_text)
    return Ran(["rollout", str(f), *args], input=input_)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_bad_line_stops_reading_started_episodes_are_written(img, tmp_path, monkeypatch):
    eng = ScriptedEngine(turn_script([answer("a")]))
    text = json.dumps(task(img, "a")) + "\n" + json.dumps(task(img, "b")) + "\n{oops\n" + json.dumps(task(img, "c")) + "\n"
    out = tmp_path / "out.jsonl"
    r = _cli(monkeypatch, eng, ["-o", str(out), "-n", "2"], text, tmp_path)
    assert r.exit_code == 1 and "tasks.jsonl:3: invalid JSON" in r.stderr
    assert sorted((x["group"], x["sample"]) for x in _lines(out)) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert "mars rollout: 4 episodes: answer 4" in r.stderr
    r = _cli(monkeypatch, eng, ["-o", str(out), "--skip-bad"], text, tmp_path)
    assert r.exit_code == 0 and [x["group"] for x in _lines(out)] == ["a", "b", "c"]


def test_max_error_rate_and_summary(img, tmp_path, monkeypatch):
    eng = ScriptedEngine(turn_script([answer("a")]), fail_when=lambda m: "bad" in question(m))
    text = "".join(json.dumps(task(img, f"t{i}", q="bad" if i < 2 else "good")) + "\n" for i in range(4))
    r = _cli(monkeypatch, eng, ["--max-error-rate", "0.5"], text, tmp_path)
    assert r.exit_code == 0 and "mars rollout: 4 episodes: answer 2, error 2" in r.stderr
    r = _cli(monkeypatch, eng, ["--max-error-rate", "0.25"], text, tmp_path)
    assert r.exit_code == 1 and "2 of 4 episodes ended in error, over --max-error-rate 0.25" in r.stderr
    assert "t0/0: RuntimeError: scripted engine failure" in r.stderr


def test_group_order_writes_groups_together(img, tmp_path, monkeypatch):
    def script(msgs):  # sample-dependent lengths interleave the groups' endings
        k = sum(m["role"] == "assistant" for m in msgs)
        want = int(question(msgs).split()[-1])
        return answer("x") if k >= want else call(protocol.ZOOM, bbox_2d=[0, 0, 900, 900])
    eng = ScriptedEngine(script)
    text = "".join(json.dumps(task(img, f"g{i}", q=f"turns {(3 - i) % 3}")) + "\n" for i in range(3))
    out = tmp_path / "out.jsonl"
    r = _cli(monkeypatch, eng, ["-o", str(out), "-n", "3", "--group-order", "--max-inflight", "9"], text, tmp_path)
    assert r.exit_code == 0, r.stderr
    recs = _lines(out)
    groups = [x["group"] for x in recs]
    assert all(groups[i:i + 3] == [groups[i]] * 3 for i in (0, 3, 6)) and sorted(set(groups)) == ["g0", "g1", "g2"]
    assert [x["sample"] for x in recs] == [0, 1, 2] * 3


def test_resume_drops_a_torn_line_and_reruns_errors(img, tmp_path, monkeypatch):
    eng = ScriptedEngine(turn_script([answer("a")]))
    text = "".join(json.dumps(task(img, f"t{i}")) + "\n" for i in range(3))
    out = tmp_path / "out.jsonl"
    done = {**task(img, "t0"), "group": "t0", "sample": 0, "finish": "answer", "prediction": "kept"}
    err = {**task(img, "t1"), "group": "t1", "sample": 0, "finish": "error", "error": "server died"}
    out.write_text(json.dumps(done) + "\n" + json.dumps(err) + "\n" + '{"group": "t2", "sam')
    r = _cli(monkeypatch, eng, ["-o", str(out), "--resume"], text, tmp_path)
    assert r.exit_code == 0, r.stderr
    recs = _lines(out)
    assert [(x["group"], x["finish"]) for x in recs][0] == ("t0", "answer") and recs[0]["prediction"] == "kept"
    assert sorted(x["group"] for x in recs) == ["t0", "t1", "t2"] and all(x["finish"] == "answer" for x in recs)
    assert "truncated last line" in r.stderr and "1 kept from the earlier run" in r.stderr
    # without --resume the file starts over
    r = _cli(monkeypatch, eng, ["-o", str(out)], json.dumps(task(img, "new")) + "\n", tmp_path)
    assert [x["group"] for x in _lines(out)] == ["new"]


def test_batch_size_is_an_alias_that_warns(img, tmp_path, monkeypatch):
    eng = ScriptedEngine(turn_script([answer("a")]))
    r = _cli(monkeypatch, eng, ["--batch-size", "2"], json.dumps(task(img)) + "\n", tmp_path)
    assert r.exit_code == 0 and "--batch-size is now --max-inflight" in r.stderr
    r = Ran(["rollout", "--server", "http://x", "--engine", "vllm"], input="")
    assert r.exit_code == 2 and "--server and --engine vllm disagree" in r.stderr


@pytest.mark.network
@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_completes(img, tmp_path):
    """D2: `rollout -o` killed with SIGKILL at random points keeps whole lines; --resume finishes it."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from helpers_rollout import OpenAIStub

    class SlowTurns(list):  # every reply takes a while, so kills land mid-run
        def __getitem__(self, i):
            time.sleep(0.03)
            return super().__getitem__(i)

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(task(img, f"t{i}")) + "\n" for i in range(30)))
    out = tmp_path / "out.jsonl"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "MARS_OPENAI_API_KEY": "k", "MARS_ARTIFACTS": str(tmp_path / "art")}
    rng = random.Random(0)
    with OpenAIStub(SlowTurns([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500]), answer("a")])) as stub:
        cmd = [sys.executable, "-m", "mars_cli", "rollout", str(tasks), "-n", "2", "-o", str(out), "--engine", "openai",
               "--model", "m", "--base-url", stub.url, "--max-inflight", "4"]
        for attempt in range(3):
            before = len(out.read_text().splitlines()) if out.exists() else 0
            p = subprocess.Popen(cmd + (["--resume"] if attempt else []), env=env, stderr=subprocess.DEVNULL)
            want = before + rng.randint(1, 8)
            deadline = time.time() + 60
            while time.time() < deadline and p.poll() is None:
                if out.exists() and len(out.read_text().splitlines()) >= want:
                    break
                time.sleep(0.01)
            time.sleep(rng.random() * 0.1)
            p.send_signal(signal.SIGKILL)
            p.wait()
            lines = out.read_bytes().split(b"\n")
            whole = [json.loads(x) for x in lines[:-1]]  # every complete line parses
            assert len(whole) >= want - 1 or p.returncode == 0
        r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = _lines(out)
    assert sorted((x["group"], x["sample"]) for x in recs) == sorted((f"t{i}", s) for i in range(30) for s in range(2))
    assert all(x["finish"] == "answer" for x in recs)


def test_loop_runs_pass_after_pass_until_the_engine_is_gone(img, tmp_path, monkeypatch):
    calls = []

    def die(msgs):
        calls.append(1)
        return len(calls) > 7

    eng = AsyncEngine(turn_script([answer("a")]), die=die)
    text = "".join(json.dumps(task(img, f"t{i}")) + "\n" for i in range(3))
    out = tmp_path / "out.jsonl"
    r = _cli(monkeypatch, eng, ["-o", str(out), "--loop", "--seed", "1", "--max-inflight", "1"], text, tmp_path)
    assert r.exit_code == 1 and "no policy server left" in r.stderr
    recs = _lines(out)
    ok = [x for x in recs if x["finish"] == "answer"]
    assert [x["group"] for x in ok[:3]] == ["t0@0", "t1@0", "t2@0"] and [x["epoch"] for x in ok[3:]] == [1, 1, 1, 2]
    assert len({x["group"] for x in ok}) == len(ok) == 7


@pytest.mark.network
@pytest.mark.slow
def test_ctrl_c_keeps_whole_records_and_exits_130(img, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from helpers_rollout import OpenAIStub

    class SlowTurns(list):
        def __getitem__(self, i):
            time.sleep(0.05)
            return super().__getitem__(i)

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(task(img, f"t{i}")) + "\n" for i in range(40)))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "MARS_OPENAI_API_KEY": "k",
           "MARS_ARTIFACTS": str(tmp_path / "art")}
    with OpenAIStub(SlowTurns([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500]), answer("a")])) as stub:
        p = subprocess.Popen([sys.executable, "-m", "mars_cli", "rollout", str(tasks), "-o", str(out), "--engine",
                              "openai", "--model", "m", "--base-url", stub.url, "--max-inflight", "4"],
                             env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not (out.exists() and len(out.read_text().splitlines()) >= 3):
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "mars rollout: " in err and " episodes: answer" in err
    recs = _lines(out)  # every line whole
    assert 3 <= len(recs) < 40 and all(r["finish"] == "answer" for r in recs)


@pytest.mark.parametrize("args,msg", [
    (["--workflow", "chat"], "--workflow must be one of agent, direct, rag"),
    (["--on-malformed", "ignore"], "--on-malformed must be end or observe"),
    (["--protocol", "nope"], "--protocol must be one of"),
    (["--batch-groups", "4"], "--batch-groups/--max-staleness follow the weights of --server"),
    (["--max-error-rate", "2"], "--max-error-rate must be in [0, 1]"),
    (["--max-inflight", "0"], "--max-inflight must be at least 1"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be at least 1"),
])
def test_episode_flag_errors_before_any_model_loads(args, msg):
    r = Ran(["rollout", "--policy", "/nonexistent", *args], input="")
    assert r.exit_code == 2 and msg in r.stderr


def test_output_checked_before_the_model_and_kept_when_it_fails(img, tmp_path, monkeypatch):
    from mars_cli.agent import run as runner

    out = tmp_path / "out.jsonl"
    out.write_text('{"kept": 1}\n')

    def broken(**kw):
        raise MarsError("policy: no such model directory")

    monkeypatch.setattr(runner, "make_engine", broken)
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps(task(img)) + "\n")
    r = Ran(["rollout", tasks, "-o", out])
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1] == "mars rollout: policy: no such model directory"
    assert out.read_text() == '{"kept": 1}\n' and "episodes:" not in r.stderr
    r = Ran(["rollout", tasks, "-o", tmp_path / "nope" / "out.jsonl"])
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_servers_dying_under_inflight_requests_end_the_run(img, tmp_path, monkeypatch):
    # every in-flight request fails (no exception): the run still ends with "no server left"
    class Dying(AsyncEngine):
        gone = False

        async def agenerate(self, req):
            self.gone = True
            return GenResult(text="", error="http://127.0.0.1:1: ConnectError")

        def lost(self):
            return "no server left: http://127.0.0.1:1: ConnectError" if self.gone else None

    eng = Dying(turn_script([answer("a")]))
    text = "".join(json.dumps(task(img, f"t{i}")) + "\n" for i in range(5))
    out = tmp_path / "out.jsonl"
    r = _cli(monkeypatch, eng, ["-o", str(out), "--max-error-rate", "1", "--max-inflight", "2"], text, tmp_path)
    assert r.exit_code == 1 and "mars rollout: no server left" in r.stderr
    assert 1 <= len(_lines(out)) <= 3 and all(x["finish"] == "error" for x in _lines(out))  # no new episode started


def test_rollout_and_ask_open_the_server_engine(img, tmp_path, monkeypatch):
    from mars_cli.agent import run as runner

    seen = []

    def make(**kw):
        seen.append(kw)
        return ScriptedEngine(turn_script([answer("a")]))

    monkeypatch.setattr(runner, "make_engine", make)
    monkeypatch.setenv("MARS_ARTIFACTS", str(tmp_path / "art"))
    r = Ran(["ask", img, "q?", "--server", "http://a:1, http://b:2", "-q", "--max-pixels", "50176"])
    assert r.exit_code == 0 and r.stdout == "a\n"
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(task(img)) + "\n")
    r = Ran(["rollout", f, "--server", "http://a:1"])
    assert r.exit_code == 0, r.stderr
    (a, b) = seen
    assert (a["name"], a["urls"], a["policy"], a["max_pixels"]) == ("server", ["http://a:1", "http://b:2"], None, 50176)
    assert (b["name"], b["urls"]) == ("server", ["http://a:1"])
