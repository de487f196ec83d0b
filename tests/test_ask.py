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


def test_ask_help_has_rollouts_prompt_and_search_flags():
    import inspect

    import typer

    from mars_cli.commands import ask, rollout

    text = CliRunner().invoke(app, ["ask", "--help"]).stdout
    assert "--system-prompt" in text and "--search-k" in text and "MARS_SYSTEM_PROMPT" in text
    # one declaration: the same option objects, so help, default and env var cannot drift
    ask_opts, rollout_opts = ({n: p.default for n, p in inspect.signature(m.main).parameters.items()}
                              for m in (ask, rollout))
    for name in ("system_prompt", "search_k", "protocol", "max_new_tokens", "max_turns", "index"):
        assert isinstance(ask_opts[name], typer.models.OptionInfo) and ask_opts[name] is rollout_opts[name], name


def test_ask_first_prompt_is_rollouts_and_prompts(tiny_policy_dir, env, tmp_path, monkeypatch):
    """MARS_SYSTEM_PROMPT reaches ask as it reaches rollout; the first prompt is `mars prompt`'s text."""
    from mars_cli.models.load import load_tokenizer

    monkeypatch.setenv("MARS_SYSTEM_PROMPT", "Search first, then answer briefly.")
    r = CliRunner().invoke(app, ["ask", env, "Who built it?", "--policy", str(tiny_policy_dir), "--protocol", "mars",
                                 "--max-new-tokens", "2", "--max-turns", "1", "--search-k", "2", "--json", "-q"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["messages"][0] == {"role": "system", "content": "Search first, then answer briefly."}
    ids, mask = rec["tokens"]["ids"], rec["tokens"]["mask"]
    tok = load_tokenizer(tiny_policy_dir)
    first = tok.decode(ids[:mask.index(1)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"id": "ask", "question": "Who built it?", "images": [env]}) + "\n")
    monkeypatch.delenv("MARS_SYSTEM_PROMPT")
    p = CliRunner().invoke(app, ["prompt", str(tasks), "--policy", str(tiny_policy_dir), "--protocol", "mars",
                                 "--system-prompt", "Search first, then answer briefly."])
    assert p.exit_code == 0, p.stderr
    assert json.loads(p.stdout)["prompt"] == first
