"""HTTP backends against servers on 127.0.0.1: real JSON shapes, every fault."""

from __future__ import annotations

import time

import pytest

from fakeservers import FakeServer, openai_routes, page_routes, retriever_routes, searxng_routes, serper_routes
from mars_cli.errors import MarsError, ToolError
from mars_cli.tools.text_search import open_text_search
from mars_cli.tools.web import HttpClient, RateLimiter, check_public

pytestmark = pytest.mark.network

FAST = dict(backoff=0.001, timeout=0.5, allow_private=True)
PAGE = "<html><head><title>Eiffel</title></head><body><article><h1>Eiffel Tower</h1><p>The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 for the World's Fair. It is 330 metres tall.</p></article></body></html>"


@pytest.fixture
def serper_env(monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "test-key")


def _serper(srv, pages_url=None, **kw):
    base = pages_url or srv.url
    hits = [{"title": "Eiffel Tower - Wiki", "link": f"{base}/eiffel", "snippet": "wrought-iron lattice tower"},
            {"title": "Paris", "link": f"{base}/paris", "snippet": "capital of France"}]
    return hits


def test_serper_fetches_pages_as_text(serper_env):
    routes = {**page_routes({"/eiffel": PAGE, "/paris": "<html><body><p>Paris is the capital of France.</p></body></html>"})}
    with FakeServer(routes) as srv:
        srv.routes.update(serper_routes(_serper(srv)))
        ts = open_text_search("serper", serper_url=srv.url, **FAST)
        res = ts.search("eiffel tower height", k=2)
    assert [r["rank"] for r in res] == [1, 2]
    assert res[0]["backend"] == "serper" and res[0]["url"].endswith("/eiffel")
    assert "330 metres" in res[0]["text"] and "<p>" not in res[0]["text"]
    assert srv.calls[0]["json"] == {"q": "eiffel tower height", "num": 2}


def test_serper_without_key_is_config_error(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(MarsError, match="SERPER_API_KEY"):
        open_text_search("serper", serper_url="http://127.0.0.1:9")


def test_retry_after_429_then_success(serper_env):
    with FakeServer({}) as srv:
        srv.routes.update(serper_routes(_serper(srv)))
        srv.faults += [("status", 429, {"Retry-After": "0.05"}), ("status", 500)]
        ts = open_text_search("serper", serper_url=srv.url, fetch=False, **FAST)
        t0 = time.monotonic()
        res = ts.search("q", k=1)
    assert res[0]["title"] == "Eiffel Tower - Wiki" and res[0]["text"] == "wrought-iron lattice tower"
    assert len([c for c in srv.calls if c["path"] == "/search"]) == 3
    assert time.monotonic() - t0 >= 0.05  # Retry-After was honoured


@pytest.mark.parametrize("fault,match", [
    ("timeout", "timed out"),
    (("status", 503), "HTTP 503"),
    ("malformed", "malformed JSON"),
    ("empty", "no results"),
])
def test_faults_become_tool_errors(serper_env, fault, match):
    with FakeServer({}, timeout_sleep=0.4) as srv:
        srv.routes.update(serper_routes(_serper(srv)))
        srv.faults += [fault] * 3
        ts = open_text_search("serper", serper_url=srv.url, fetch=False, **{**FAST, "timeout": 0.2, "retries": 2})
        with pytest.raises(ToolError, match=match):
            ts.search("q")


def test_client_error_is_not_retried(monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "wrong")
    with FakeServer({}) as srv:
        srv.routes.update(serper_routes([]))
        ts = open_text_search("serper", serper_url=srv.url, fetch=False, **FAST)
        with pytest.raises(ToolError, match="HTTP 403"):
            ts.search("q")
        assert len(srv.calls) == 1


def test_huge_page_is_capped_and_falls_back_to_snippet(serper_env):
    with FakeServer({}) as srv:
        srv.routes.update(serper_routes(_serper(srv)))
        srv.routes.update(page_routes({"/eiffel": PAGE}))
        srv.faults += [None, "huge"]  # the search call answers normally, the page fetch is huge
        ts = open_text_search("serper", serper_url=srv.url, workers=1, max_bytes=100_000, **FAST)
        res = ts.search("q", k=1)
    assert res[0]["text"] == "wrought-iron lattice tower"
    assert "too large" in res[0]["fetch_error"]


def test_non_text_page_refused(serper_env):
    with FakeServer({}) as srv:
        srv.routes.update(serper_routes(_serper(srv)))
        srv.routes.update(page_routes({"/eiffel": "\x89PNG"}, content_type="image/png"))
        res = open_text_search("serper", serper_url=srv.url, **FAST).search("q", k=1)
    assert "not a text page" in res[0]["fetch_error"]


def test_ssrf_result_urls_refused_without_allow_private(serper_env):
    with FakeServer(page_routes({"/eiffel": PAGE})) as srv:
        srv.routes.update(serper_routes(_serper(srv)))
        ts = open_text_search("serper", serper_url=srv.url, backoff=0.001)  # no allow_private
        res = ts.search("q", k=1)
        assert "non-public address 127.0.0.1" in res[0]["fetch_error"]
        assert not any(c["path"] == "/eiffel" for c in srv.calls)


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://[::1]/", "http://169.254.169.254/latest", "http://10.0.0.1/",
                                 "http://192.168.1.1/", "http://0.0.0.0/", "file:///etc/passwd", "http://[::ffff:127.0.0.1]/"])
def test_check_public_refuses(url):
    with pytest.raises(ToolError, match="refusing"):
        check_public(url)


def test_redirect_to_private_refused():
    with FakeServer({("GET", "/r"): lambda req: (302, {"Location": "http://127.0.0.1:1/secret"}, b"")}) as srv:
        http = HttpClient(backoff=0.001, allow_private=False)
        with pytest.raises(ToolError, match="non-public"):
            http.get_bytes(f"{srv.url}/r", what="t")


def test_searxng_and_retriever_shapes():
    results = [{"url": "https://a.example/1", "title": "A", "content": "alpha snippet", "score": 2.0}]
    docs = [{"id": "7", "contents": '"Mont Blanc"\nMont Blanc is the highest mountain in the Alps.'}]
    with FakeServer({**searxng_routes(results), **retriever_routes(docs)}) as srv:
        sx = open_text_search("searxng", searxng_url=srv.url, **FAST).search("alpha")
        rt = open_text_search("retriever", retriever_url=srv.url, **FAST).search("highest alps", k=3)
    assert sx[0] == {"rank": 1, "title": "A", "text": "alpha snippet", "url": "https://a.example/1", "score": 1.0,
                     "backend": "searxng", "snippet": "alpha snippet"}
    assert rt == [{"rank": 1, "title": "Mont Blanc", "text": "Mont Blanc is the highest mountain in the Alps.",
                   "doc_id": "7", "score": 10.0, "backend": "retriever"}]
    assert srv.calls[-1]["json"] == {"queries": ["highest alps"], "topk": 3, "return_scores": True}


def test_summarize_two_stage(monkeypatch):
    monkeypatch.setenv("MARS_LLM_API_KEY", "sk-secret")
    prompts = []

    def reply(prompt):
        prompts.append(prompt)
        return "OVERALL: 1889 [1]" if "Combine them" in prompt else "Page says completed in 1889."

    docs = [{"id": "1", "contents": '"Eiffel"\nCompleted in 1889.'}, {"id": "2", "contents": '"Other"\nUnrelated.'}]
    with FakeServer({**openai_routes(reply), **retriever_routes(docs)}) as srv:
        ts = open_text_search("retriever", retriever_url=srv.url, summarize=True, llm_base_url=srv.url + "/v1",
                              llm_model="m", **FAST)
        res = ts.search("when was it built", k=2)
        auth = [c["headers"].get("Authorization") for c in srv.calls if c["path"].endswith("completions")]
    assert len(prompts) == 3 and all(a == "Bearer sk-secret" for a in auth)
    assert res[0]["summary"] == "Page says completed in 1889." and res[0]["query_summary"] == "OVERALL: 1889 [1]"
    assert "sk-secret" not in str(res) and "sk-secret" not in str(ts.params)


def test_rate_limiter_spaces_calls():
    rl = RateLimiter(50.0, burst=1)
    t0 = time.monotonic()
    for _ in range(6):
        rl.acquire()
    assert time.monotonic() - t0 >= 0.09  # 5 waits of 1/50 s after the first token


def test_cut_body_is_a_tool_error():
    with FakeServer(retriever_routes([])) as srv:
        srv.faults.append("cut")
        ts = open_text_search("retriever", retriever_url=srv.url, **{**FAST, "retries": 0})
        with pytest.raises(ToolError, match="reading the response failed"):
            ts.search("q")


def test_credentials_in_urls_stay_out_of_cache_keys(tmp_path):
    docs = [{"id": "1", "contents": '"A"\nalpha'}]
    with FakeServer(retriever_routes(docs)) as srv:
        url = srv.url.replace("http://", "http://user:hunter2@")
        ts = open_text_search("retriever", retriever_url=url, cache=str(tmp_path), **FAST)
        assert ts.search("alpha")[0]["text"] == "alpha"
    assert "hunter2" not in str(ts.params) and b"hunter2" not in (tmp_path / "tools.sqlite").read_bytes()


def test_rate_limit_applies_to_api_calls(serper_env):
    with FakeServer({}) as srv:
        srv.routes.update(serper_routes(_serper(srv)))
        ts = open_text_search("serper", serper_url=srv.url, fetch=False, rate_limit=20, **FAST)
        t0 = time.monotonic()
        for i in range(23):  # a burst of 20, then one call per 1/20 s
            ts.search(f"q{i}", k=1)
    assert time.monotonic() - t0 >= 0.14


def test_replay_needs_no_api_key(serper_env, tmp_path, monkeypatch):
    with FakeServer({}) as srv:
        srv.routes.update(serper_routes(_serper(srv)))
        recorded = open_text_search("serper", serper_url=srv.url, fetch=False, cache=str(tmp_path), **FAST).search("eiffel", k=2)
    monkeypatch.delenv("SERPER_API_KEY")
    replayed = open_text_search("serper", serper_url=srv.url, fetch=False, cache=str(tmp_path), replay=True, **FAST).search(" eiffel ", k=2)
    assert replayed == recorded


def test_page_charset_is_honoured():
    page = '<html><head><meta charset="iso-8859-1"></head><body><article><p>Café Procope, Paris, fondé en 1686 — le plus ancien café de la ville encore ouvert aujourd’hui, dit-on souvent.</p></article></body></html>'
    with FakeServer({("GET", "/p"): lambda req: (200, {"Content-Type": "text/html"}, page.replace("—", "-").replace("’", "'").encode("latin-1"))}) as srv:
        text = HttpClient(**FAST).fetch_text(f"{srv.url}/p")
    assert "Café Procope" in text and "fondé en 1686" in text


def test_fetch_is_pinned_to_the_checked_address(monkeypatch):
    """The page is fetched from the address that was checked, under its own Host name:
    "public.test" resolves only through our patched resolver, never through httpx's."""
    import socket

    from mars_cli.tools import web

    real = socket.getaddrinfo
    looked_up = []

    def fake_getaddrinfo(host, *a, **kw):
        looked_up.append(host)
        if host == "public.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(web, "_is_public", lambda addr: True)  # pretend 127.0.0.1 is public
    with FakeServer(page_routes({"/p": PAGE})) as srv:
        port = srv.url.rsplit(":", 1)[1]
        text = HttpClient(backoff=0.001).fetch_text(f"http://public.test:{port}/p")
        host = srv.calls[-1]["headers"].get("Host")
    assert "330 metres" in text and host == f"public.test:{port}" and looked_up.count("public.test") == 1
