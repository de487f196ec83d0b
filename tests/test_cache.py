"""The record/replay tool cache: keys, exact replay, threads, secrets."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from mars_cli.errors import MarsError, ToolError
from mars_cli.tools.cache import ReplayMiss, ToolCache, cache_key, normalize, open_cache


def test_key_normalization_and_secrets():
    assert cache_key("t", {"query": "  Eiffel   tower "}) == cache_key("t", {"query": "Eiffel tower"})
    assert cache_key("t", {"query": "a", "k": 5}) == cache_key("t", {"k": 5.0, "query": "a"})
    assert cache_key("t", {"query": "a"}) != cache_key("t", {"query": "A"})
    assert cache_key("t", {"query": "a"}, {"backend": "x"}) != cache_key("t", {"query": "a"}, {"backend": "y"})
    assert cache_key("t", {"q": "a"}) != cache_key("u", {"q": "a"})
    # a key never depends on (or contains) a secret
    assert cache_key("t", {"q": "a"}, {"api_key": "s1"}) == cache_key("t", {"q": "a"}, {"api_key": "s2"})
    assert normalize({"q": "a", "SERPER_API_KEY": "s", "auth_token": "t", "nested": {"password": "p", "x": 1}}) == {"nested": {"x": 1}, "q": "a"}


def test_wrap_records_then_replays_exactly(tmp_path):
    calls = []
    value = {"results": [{"rank": 1, "title": "É t", "score": 0.125, "tags": [None, True]}]}

    def fn():
        calls.append(1)
        return value

    c = ToolCache(tmp_path)
    first = c.wrap("text_search", fn, {"query": "q"}, {"backend": "b"})
    again = c.wrap("text_search", fn, {"query": "q"}, {"backend": "b"})
    assert first == again == value and len(calls) == 1 and (c.hits, c.misses) == (1, 1)
    first["results"].clear()  # a caller mutating its copy cannot corrupt the cache
    c.close()
    r = ToolCache(tmp_path, replay=True)
    assert r.wrap("text_search", fn, {"query": "  q "}, {"backend": "b"}) == value and len(calls) == 1
    with pytest.raises(ReplayMiss, match='replay: no recorded result for text_search {"query":"other"}'):
        r.wrap("text_search", fn, {"query": "other"}, {"backend": "b"})
    assert isinstance(ReplayMiss("x"), ToolError)


def test_errors_are_not_recorded(tmp_path):
    c = ToolCache(tmp_path)

    def boom():
        raise ToolError("timed out")

    with pytest.raises(ToolError):
        c.wrap("t", boom, {"q": 1})
    assert len(c) == 0
    assert c.wrap("t", lambda: [], {"q": 1}) == [] and c.wrap("t", lambda: 1 / 0, {"q": 1}) == []  # empty lists are values


def test_threads_share_one_cache(tmp_path):
    c = ToolCache(tmp_path)
    errors = []

    def work(n):
        try:
            for i in range(40):
                assert c.wrap("t", lambda: {"v": i % 10}, {"i": i % 10}) == {"v": i % 10}
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(c) == 10
    # WAL mode lets another process (here: connection) read while we hold ours
    assert sqlite3.connect(tmp_path / "tools.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_open_cache_config(tmp_path, monkeypatch):
    monkeypatch.delenv("MARS_CACHE", raising=False)
    assert open_cache(None) is None
    with pytest.raises(MarsError, match="--replay needs a cache"):
        open_cache(None, replay=True)
    with pytest.raises(MarsError, match="needs a recorded cache"):
        open_cache(tmp_path / "empty", replay=True)
    monkeypatch.setenv("MARS_CACHE", str(tmp_path / "env"))
    assert open_cache(None).dir == tmp_path / "env"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tools.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(MarsError, match="not a usable SQLite"):
        ToolCache(tmp_path / "bad")
