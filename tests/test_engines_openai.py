"""The openai engine against a stub OpenAI-compatible server on 127.0.0.1, and `mars rollout --engine openai`."""

from __future__ import annotations

import json

import orjson
import pytest
from typer.testing import CliRunner

from helpers_rollout import OpenAIStub as Stub, answer, call, make_image
from mars_cli import protocol
from mars_cli.engines import GenRequest, Sampling, open_engine
from mars_cli.main import app
from mars_cli.records import make_task

pytestmark = pytest.mark.network


def test_engine_contract(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "sk-test-secret")
    img = make_image(tmp_path / "a.jpg")
    with Stub([answer("42")]) as stub:
        eng = open_engine("openai", policy=None, sampling=Sampling(temperature=0.5, top_k=20, seed=3),
                          base_url=stub.url, model="stub-model")
        msgs = protocol.initial_messages(make_task("t", "q?", images=[img]))
        msgs += [{"role": "assistant", "content": "x"}, protocol.tool_message(protocol.ZOOM, "Here", [img])]
        [res] = eng.generate([GenRequest(messages=msgs, max_new_tokens=77)])
    assert res.text == answer("42") and res.ids is None and res.logprobs is None and res.finish == "stop"
    assert res.usage == 220 and res.error is None
    req = stub.requests[0]
    assert req["model"] == "stub-model" and req["max_tokens"] == 77 and req["temperature"] == 0.5
    assert req["seed"] == 3 and req["top_k"] == 20
    user = req["messages"][1]["content"]
    assert user[0]["type"] == "image_url" and user[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    tool = req["messages"][3]
    # one text part before the image, as the chat template joins them (and eval.py:1499-1504 sends them)
    assert tool["role"] == "user" and tool["content"][0]["text"] == "<tool_response>\nHere"
    assert tool["content"][1]["type"] == "image_url" and tool["content"][2]["text"] == "\n</tool_response>"
    assert stub.headers[0]["authorization"] == "Bearer sk-test-secret"
    d = eng.describe()
    assert d["trainable"] is False and "sk-test" not in json.dumps(d)


def test_engine_error_is_a_result(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "k")
    with Stub([None]) as stub:
        eng = open_engine("openai", policy="m", sampling=Sampling(), base_url=stub.url, max_retries=0)
        [res] = eng.generate([GenRequest(messages=[{"role": "user", "content": "hi"}])])
    assert res.error and "400" in res.error


def test_rollout_cli_openai(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "sk-never-in-records")
    img = make_image(tmp_path / "a.jpg")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(b"".join(orjson.dumps(make_task(f"t{i}", "what?", images=[img])) + b"\n" for i in range(2)))
    out = tmp_path / "run" / "traj.jsonl"
    out.parent.mkdir()
    with Stub([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500]), answer("red")]) as stub:
        r = CliRunner().invoke(app, ["rollout", str(tasks), "--engine", "openai", "--model", "stub", "--base-url", stub.url,
                                     "-n", "2", "-o", str(out)])
        assert r.exit_code == 0, r.stderr
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == 4 and {(x["group"], x["sample"]) for x in recs} == {(f"t{i}", s) for i in range(2) for s in range(2)}
        for x in recs:
            assert x["finish"] == "answer" and x["prediction"] == "red" and x["tokens"] is None
            assert x["tool_calls"][0]["ok"] and x["policy"]["engine"] == "openai"
            crop = x["messages"][3]["content"][1]["image"]
            assert crop.startswith(str(out.parent / "artifacts"))
        assert "sk-never" not in out.read_text()
        # --resume: everything is done, nothing is asked again
        before = len(stub.requests)
        r = CliRunner().invoke(app, ["rollout", str(tasks), "--engine", "openai", "--model", "stub", "--base-url", stub.url,
                                     "-n", "3", "-o", str(out), "--resume"])
        assert r.exit_code == 0, r.stderr
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == 6 and sorted(x["sample"] for x in recs if x["group"] == "t0") == [0, 1, 2]
        assert len(stub.requests) - before == 4  # two new episodes of two turns


def test_rollout_bad_task_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "k")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "a", "question": "q"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    out = tmp_path / "o.jsonl"
    with Stub([answer("x")]) as stub:
        r = CliRunner().invoke(app, ["rollout", str(tasks), "--engine", "openai", "--model", "m", "--base-url", stub.url,
                                     "-o", str(out)])
    assert r.exit_code == 1
    assert "tasks.jsonl:2" in r.stderr and "question" in r.stderr
    # the episode started before the bad line finished and was written (-o appends per episode)
    assert [json.loads(x)["group"] for x in out.read_text().splitlines()] == ["a"]


def test_rollout_reads_stdin_and_streams(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "k")
    monkeypatch.setenv("MARS_ARTIFACTS", str(tmp_path / "art"))
    lines = "".join(json.dumps(make_task(f"t{i}", "q?")) + "\n" for i in range(3))
    with Stub([answer("yes")]) as stub:
        r = CliRunner().invoke(app, ["rollout", "--engine", "openai", "--model", "m", "--base-url", stub.url, "-n", "2"],
                               input=lines)
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(recs) == 6 and all(x["prediction"] == "yes" and x["schema_version"] == 1 for x in recs)
