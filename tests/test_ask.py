"""`mars ask`: the trace on stderr, the answer (or --json record) on stdout."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers_rollout import OpenAIStub, answer, call, make_image
from mars_cli import protocol
from mars_cli.main import app


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "k")
    monkeypatch.setenv("MARS_ARTIFACTS", str(tmp_path / "art"))
    return make_image(tmp_path / "photo.jpg", size=(640, 480))


@pytest.mark.network
def test_ask_trace_and_answer(env, tmp_path):
    turns = [call(protocol.ZOOM, bbox_2d=[100, 100, 500, 500], label="sign"),
             call(protocol.TEXT_SEARCH, query="octagon sign"),
             answer("STOP")]
    with OpenAIStub(turns) as stub:
        r = CliRunner().invoke(app, ["ask", env, "What does the sign say?", "--engine", "openai", "--model", "m",
                                     "--base-url", stub.url])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "STOP\n"
    err = r.stderr
    assert "turn 1" in err and "thinking" in err and "image_zoom_in_tool" in err
    assert "crop      box (0.100, 0.100, 0.500, 0.500)" in err and str(tmp_path / "art") in "".join(err.split())
    assert "text search is not available" in err or "Search not available" in err  # no index: the model is told (per profile)
    assert "answer    STOP" in err and "finish    answer after 3 turns, 2 tool calls (1 failed)" in err


@pytest.mark.network
def test_ask_json_and_no_answer(env):
    with OpenAIStub(["<thinking>I cannot tell.</thinking>"]) as stub:
        r = CliRunner().invoke(app, ["ask", env, "q?", "--engine", "openai", "--model", "m", "--base-url", stub.url, "--json", "-q"])
        assert r.exit_code == 0, r.stderr
        rec = json.loads(r.stdout)
        assert rec["finish"] == "no_action" and rec["images"] == [env] and "turn 1" not in r.stderr
        r = CliRunner().invoke(app, ["ask", env, "q?", "--engine", "openai", "--model", "m", "--base-url", stub.url])
    assert r.exit_code == 1 and r.stdout == ""
    assert "no answer: the episode ended with no_action" in r.stderr


def test_ask_missing_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["ask", "nope.jpg", "q?", "--policy", "."])
    assert r.exit_code == 1 and "no such image file" in r.stderr


def test_ask_tiny_model(tiny_policy_dir, env):
    r = CliRunner().invoke(app, ["ask", env, "What is it?", "--policy", str(tiny_policy_dir), "--max-new-tokens", "6",
                                 "--max-turns", "2", "--json"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["policy"]["engine"] == "hf" and rec["finish"] in ("max_tokens", "no_action", "max_turns", "answer")
    assert rec["tokens"]["mask"].count(1) >= 1 and "turn 1" in r.stderr
