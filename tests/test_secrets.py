"""Credentials in URLs never reach records, logs, settings files or trackers (R8, R9, R10).

One masking function (mars_cli.urls.redact) serves `mars env`, every log line, warnings,
errors, mars_settings.json and the trackers' run config; server and push URLs are known
by their credential-free form (mars_cli.urls.public_url).
"""

from __future__ import annotations

import json
import shutil
import sys

import orjson
import pytest

import helpers_train as H
from clirun import Ran
from fakeservers import FakeServer, openai_routes
from mars_cli.envinfo import masked
from mars_cli.urls import join, public_url, redact

SECRETS = ("hunter2", "p@ss", "sk-TOKEN", "SECRETX", "tok123")


def leaks(text) -> list[str]:
    text = text if isinstance(text, str) else text.decode("utf-8", "replace")
    return [s for s in SECRETS if s in text]


@pytest.mark.parametrize("raw,shown", [
    ("http://user:hunter2@host:8000/v1", "http://user:***@host:8000/v1"),
    ("http://sk-TOKEN123@host/v1", "http://***@host/v1"),  # a token without ':'
    ("https://user:p@ss@w0rd@host/x", "https://user:***@host/x"),  # a password holding '@'
    ("http://h/v1?token=tok123&q=1", "http://h/v1?token=***&q=1"),
    ("http://h/?api_key=a&key=b&access_token=c&X-Amz-Signature=d&keyword=ok",
     "http://h/?api_key=***&key=***&access_token=***&X-Amz-Signature=***&keyword=ok"),
    ("servers http://a:hunter2@h1:1,http://sk-TOKEN@h2:2 are down", "servers http://a:***@h1:1,http://***@h2:2 are down"),
    ("write to me@example.org or see http://h/x", "write to me@example.org or see http://h/x"),
])
def test_r9_redact_masks_every_form(raw, shown):
    assert redact(raw) == shown
    assert redact(shown) == shown  # masking twice changes nothing


def test_r9_env_masks_bare_tokens_passwords_with_at_and_query_secrets():
    env = {"MARS_SERVER": "http://sk-TOKEN9@127.0.0.1:8000", "MARS_JUDGE_BASE_URL": "https://u:p@ss@judge.example/v1",
           "MARS_RETRIEVER_URL": "http://h:8001/retrieve?token=tok123", "MARS_OPENAI_BASE_URL": "http://h/v1?api_key=SECRETX"}
    for name, value in env.items():
        assert not leaks(masked(name, value)), (name, masked(name, value))
    assert masked("MARS_SERVER", env["MARS_SERVER"]) == "http://***@127.0.0.1:8000"
    assert masked("MARS_JUDGE_BASE_URL", env["MARS_JUDGE_BASE_URL"]) == "https://u:***@judge.example/v1"
    r = Ran(["env"], env=env)
    assert r.exit_code == 0 and not leaks(r.stdout + r.stderr), r.stdout
    assert "MARS_RETRIEVER_URL=http://h:8001/retrieve?token=***" in r.stdout


def test_r10_join_keeps_the_query_after_the_path():
    assert join("http://h/v1?api_key=X", "/chat/completions") == "http://h/v1/chat/completions?api_key=X"
    assert join("http://h/v1/", "chat/completions") == "http://h/v1/chat/completions"
    assert public_url("http://u:hunter2@h/v1?api_key=X&a=1") == "http://h/v1?api_key=***&a=1"


def test_r10_base_url_query_goes_after_the_route_and_out_of_the_debug_log(tmp_path, monkeypatch):
    from helpers_rollout import answer, make_image
    from mars_cli.records import make_task

    monkeypatch.delenv("MARS_OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(orjson.dumps(make_task("t0", "what?", images=[make_image(tmp_path / "a.jpg")])) + b"\n")
    out = tmp_path / "traj.jsonl"
    with FakeServer(openai_routes(lambda prompt: answer("red"))) as srv:
        r = Ran(["-vv", "rollout", tasks, "--engine", "openai", "--model", "m", "--base-url", f"{srv.url}/v1?api_key=SECRETX",
                 "-o", out])
    assert r.exit_code == 0, r.stderr
    assert [(c["path"], c["query"]) for c in srv.calls] == [("/v1/chat/completions", {"api_key": ["SECRETX"]})]
    assert "/v1/chat/completions?api_key=***" in r.stderr  # the request was logged, masked
    assert not leaks(r.stderr) and not leaks(out.read_text())
    assert json.loads(out.read_text())["prediction"] == "red"


def test_r10_judge_base_url_query_goes_after_the_route():
    import asyncio

    from mars_cli.rl.llm_judge import AsyncJudge

    with FakeServer(openai_routes(lambda prompt: "<verdict>yes</verdict>")) as srv:
        async def go():
            async with AsyncJudge(f"{srv.url}/v1?key=SECRETX", "m", rubric="strict", timeout=5, retries=0) as j:
                return await j.judge("q", ["a"], "a")

        v = asyncio.run(go())
    assert v.accuracy == 1.0 and v.error is None
    assert [(c["path"], c["query"]) for c in srv.calls] == [("/v1/chat/completions", {"key": ["SECRETX"]})]


def test_r8_wandb_offline_run_and_tensorboard_carry_no_url_credentials(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from mars_cli.tracking import open_tracker

    for k in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb records the command line: it must see the masked one, and get it back after
    argv = ["mars", "update", "--follow", "--push", "http://user:hunter2@127.0.0.1:9", "--server", "http://sk-TOKEN@h:1"]
    monkeypatch.setattr(sys, "argv", list(argv))
    config = {"push": "http://user:hunter2@127.0.0.1:9,http://sk-TOKEN@h:1", "lr": 1e-3}
    for backend in ("wandb", "tensorboard"):
        with open_tracker(backend, logging_dir=tmp_path / backend, command="update", config=config) as t:
            t.log({"loss": 1.0}, step=1)
    assert sys.argv == argv
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any("tfevents" in p.name for p in files)
    assert [p.name for p in files if leaks(p.read_bytes())] == []
    assert any(b"user:***@127.0.0.1:9" in p.read_bytes() for p in files if p.suffix == ".wandb")


@pytest.mark.network
def test_r8_server_and_push_credentials_reach_no_record_log_or_settings_file(tiny_policy_dir, tmp_path):
    from mars_cli.records import make_task
    from mars_cli.serve.app import App
    from mars_cli.serve.hf_backend import HFBackend
    from mars_cli.serve.run import in_thread

    ck = tmp_path / "ck"
    shutil.copytree(tiny_policy_dir, ck)
    batch = H.write_batch(ck, tmp_path / "b.jsonl", [1.0, -1.0], image_dir=tmp_path)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(orjson.dumps(make_task("t0", "what?", images=[H.make_image(tmp_path / "a.jpg")])) + b"\n")
    dead = "http://sk-TOKEN@127.0.0.1:9"
    app = App(HFBackend(), allow_load=str(tmp_path), max_images=4, max_image_bytes=1 << 20)
    with in_thread(app, str(ck)) as url:
        cred = url.replace("http://", "http://user:hunter2@")
        # A push to a live server with a password and to a dead one with a token: exit 1, both named
        r = Ran(["-vv", "update", batch, "--policy", ck, "--out", tmp_path / "ck2", "--lr", "1e-3",
                 "--push", f"{cred},{dead}", "--report-to", "tensorboard", "--logging-dir", tmp_path / "tb"])
        assert r.exit_code == 1, r.stderr
        assert "http://127.0.0.1:9" in r.stderr and "not loaded by 1 of 2 server(s)" in r.stderr
        written = [r.stdout, r.stderr] + [p.read_bytes() for p in (tmp_path / "ck2").rglob("*.json")] \
            + [p.read_bytes() for p in (tmp_path / "tb").rglob("*") if p.is_file()]
        assert (tmp_path / "ck2" / "mars_settings.json").exists()
        assert [w[:300] for w in written if leaks(w)] == []
        r = Ran(["update", batch, "--policy", tmp_path / "ck2", "--out", tmp_path / "ck3", "--lr", "1e-3", "--push", cred])
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["push"][0]["url"] == url and not leaks(r.stdout + r.stderr)
        # Rollout through the password URL (Basic auth on the wire) beside the dead one
        out = tmp_path / "traj.jsonl"
        r = Ran(["-v", "rollout", "--server", f"{cred},{dead}", "-n", "1", "--max-turns", "1", "--max-new-tokens", "4",
                 "-o", out, tasks])
        assert r.exit_code == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["policy"]["servers"] == [url] and "http://127.0.0.1:9" in r.stderr
    assert not leaks(r.stderr) and not leaks(out.read_text())


def test_r8_every_log_handler_masks_urls(capsys):
    """The CLI's root handler and `mars serve`'s own logger format through urls.redact."""
    import logging

    from mars_cli.serve.run import setup_logging

    r = Ran(["-vv", "env"])  # the root callback installs the CLI's handler
    assert r.exit_code == 0
    serve_log = logging.getLogger("mars.serve")
    saved = (list(serve_log.handlers), serve_log.propagate, serve_log.level)
    serve_log.handlers = []
    try:
        setup_logging()
        for logger in (logging.getLogger(), serve_log):
            line = logger.handlers[0].format(logging.LogRecord("x", logging.WARNING, __file__, 1, "push to %s failed",
                                                              ("http://user:hunter2@h:1/?token=tok123",), None))
            assert "http://user:***@h:1/?token=***" in line and not leaks(line)
    finally:
        serve_log.handlers, serve_log.propagate, serve_log.level = saved[0], saved[1], saved[2]
