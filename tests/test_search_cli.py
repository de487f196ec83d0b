"""`mars index text` and `mars search` through the CLI: records, stdin, replay, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from fakeservers import FakeServer, retriever_routes
from mars_cli.main import app
from clirun import Ran

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]



def invoke(args, input=None):
    return Ran(args, input)

ROWS = [
    {"id": "d1", "contents": '"Great Wall"\nThe Great Wall of China was built over centuries to protect Chinese states from nomadic raids.'},
    {"id": "d2", "contents": '"Nile"\nThe Nile is a major north-flowing river in northeastern Africa that drains into the Mediterranean Sea.'},
    {"id": "d3", "contents": '"Big Ben"\nBig Ben is the nickname of the Great Bell of the clock at the Palace of Westminster in London.'},
]


def lines(text):
    return [json.loads(x) for x in text.splitlines() if x.strip()]


@pytest.fixture
def idx(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    r = invoke(["index", "text", str(corpus), "--out", str(tmp_path / "idx")])
    assert r.exit_code == 0, r.stderr
    (m,) = lines(r.stdout)
    assert m["passages"] == 3 and m["index"] == str(tmp_path / "idx") and m["schema_version"] == 1
    return tmp_path / "idx"


def test_search_args_one_record_per_result(idx):
    r = invoke(["search", "--index", str(idx), "-k", "2", "which", "river", "flows", "north"])
    assert r.exit_code == 0, r.stderr
    recs = lines(r.stdout)
    assert recs[0]["query"] == "which river flows north" and recs[0]["doc_id"] == "d2" and recs[0]["title"] == "Nile"
    assert recs[0]["rank"] == 1 and recs[0]["backend"] == "local" and r.stderr == ""


def test_search_stdin_passes_fields_through_and_groups(idx):
    stdin = json.dumps({"id": "t1", "query": "bell of the clock in london", "extra": [1]}) + "\n" + json.dumps({"query": "qqqzzz"}) + "\n"
    r = invoke(["search", "--index", str(idx), "--group", "--budget", "300"], input=stdin)
    assert r.exit_code == 1
    a, b = lines(r.stdout)
    assert a["id"] == "t1" and a["extra"] == [1] and a["results"][0]["doc_id"] == "d3"
    assert a["context"].startswith('Search results for "bell of the clock in london":\n[1] Big Ben (doc d3)') and len(a["context"]) <= 300
    assert b["results"] == [] and "no results" in b["error"]
    assert "<stdin>:2: no results for 'qqqzzz'" in r.stderr and "1 of the queries failed" in r.stderr


def test_search_env_index_and_errors(idx, tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_INDEX", str(idx))
    assert lines(invoke(["search", "great wall"]).stdout)[0]["doc_id"] == "d1"
    r = invoke(["search", "--index", str(tmp_path), "x"])
    assert r.exit_code == 1 and r.stderr.startswith("mars search: ") and "not a text index" in r.stderr and r.stdout == ""
    r = invoke(["search", "qqqzzz"])
    assert r.exit_code == 1 and r.stderr == "mars search: no results for 'qqqzzz'\n"
    r = invoke(["search", "--backend", "bing", "x"])
    assert r.exit_code == 1 and "unknown text search backend 'bing'" in r.stderr
    r = invoke(["search"], input='{"q": "x"}\n')
    assert r.exit_code == 1 and "<stdin>:1: a query record needs a string field 'query'" in r.stderr


def test_index_bad_corpus_line_is_located(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps(ROWS[0]) + "\n" + '{"id": 2, "body": "x"}\n')
    r = invoke(["index", "text", str(corpus), "--out", str(tmp_path / "idx")])
    assert r.exit_code == 1 and f"{corpus}:2: a passage needs 'contents' or 'text'" in r.stderr
    assert not (tmp_path / "idx").exists()
    r = invoke(["index", "text", "--out", str(tmp_path / "idx2")], input=json.dumps(ROWS[1]) + "\n")
    assert r.exit_code == 0 and lines(r.stdout)[0]["source"] == "<stdin>"


@pytest.mark.network
def test_replay_is_deterministic_and_offline(tmp_path):
    docs = [{"id": "r1", "contents": '"Alps"\nMont Blanc is the highest peak of the Alps.'}]
    cache = tmp_path / "cache"
    with FakeServer(retriever_routes(docs)) as srv:
        args = ["search", "--backend", "retriever", "--retriever-url", srv.url, "--cache", str(cache), "highest", "alps"]
        rec = invoke(args)
        assert rec.exit_code == 0, rec.stderr
        url = srv.url
    # the server is gone: only the cache can answer now
    rep = invoke(["search", "--backend", "retriever", "--retriever-url", url, "--cache", str(cache), "--replay", "highest   alps"])
    assert rep.exit_code == 0, rep.stderr
    assert lines(rep.stdout)[0]["title"] == "Alps"
    assert [{k: v for k, v in x.items() if k != "query"} for x in lines(rep.stdout)] == \
        [{k: v for k, v in x.items() if k != "query"} for x in lines(rec.stdout)]
    miss = invoke(["search", "--backend", "retriever", "--retriever-url", url, "--cache", str(cache), "--replay", "other"])
    assert miss.exit_code == 1 and "replay: no recorded result for text_search" in miss.stderr
    # the key never holds a secret, and the stored args are the normalized query
    import sqlite3

    rows = sqlite3.connect(cache / "tools.sqlite").execute("SELECT tool, args FROM calls").fetchall()
    assert rows == [("text_search", orjson.dumps({"k": 5, "query": "highest alps"}).decode())]


def test_real_pipeline_index_then_search_head(tmp_path):
    import subprocess
    import sys

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    mars = [sys.executable, "-m", "mars_cli"]
    built = subprocess.run(mars + ["index", "text", str(corpus), "--out", str(tmp_path / "idx")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    queries = "".join(json.dumps({"query": q}) + "\n" for q in ["great wall china", "river africa", "london clock bell"] * 50)
    p = subprocess.run(" ".join(mars) + f" search --index {tmp_path / 'idx'} -k 1 | head -2", shell=True, input=queries,
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == ""
    assert [json.loads(x)["doc_id"] for x in p.stdout.splitlines()] == ["d1", "d2"]


@pytest.mark.network
def test_search_summarize_group_context(tmp_path, monkeypatch):
    from fakeservers import openai_routes

    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-shown")
    docs = [{"id": "r1", "contents": '"Alps"\nMont Blanc is the highest peak of the Alps at 4,806 m.'}]
    reply = lambda p: "Mont Blanc, 4,806 m [1]." if "Combine them" in p else "Highest Alpine peak: Mont Blanc."  # noqa: E731
    with FakeServer({**retriever_routes(docs), **openai_routes(reply)}) as srv:
        r = invoke(["search", "--backend", "retriever", "--retriever-url", srv.url, "--summarize", "--llm-base-url", f"{srv.url}/v1",
                    "--llm-model", "judge-1", "--group", "--cache", str(tmp_path / "c"), "highest", "alps"])
    assert r.exit_code == 0, r.stderr
    (rec,) = lines(r.stdout)
    assert rec["context"] == ('Search results for "highest alps":\nSummary: Mont Blanc, 4,806 m [1].\n'
                              "[1] Alps (doc r1)\nHighest Alpine peak: Mont Blanc.")
    assert "sk-never-shown" not in r.stdout + r.stderr
    assert b"sk-never-shown" not in (tmp_path / "c" / "tools.sqlite").read_bytes()
    r = invoke(["search", "--backend", "retriever", "--retriever-url", "http://127.0.0.1:9", "--summarize"], input='{"query": "x"}\n')
    assert r.exit_code == 1 and "--summarize needs an LLM endpoint" in r.stderr


def test_search_serve_answers_retrieve_and_stops_on_ctrl_c(idx, tmp_path):
    import re
    import signal

    import httpx

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "mars_cli", "search", "--serve", "--index", str(idx), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        ready = json.loads(p.stdout.readline())  # the ready line, once listening
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/retrieve", ready["url"]), ready
        assert ready["passages"] == 3 and ready["index"] == str(idx)
        assert ready["method"] == "bm25"  # an index without vectors is served by BM25, and says so
        r = httpx.post(ready["url"], json={"queries": ["Great Wall of China"], "topk": 2, "return_scores": True}, timeout=30)
        assert r.status_code == 200 and len(r.json()["result"][0]) == 2
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out == "" and f"on {ready['url']}" in err and "stopped" in err
