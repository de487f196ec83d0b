"""The LLM judge client: prompts, verdict parsing, retries, the cache — against a stub server."""

import asyncio
import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mars_cli.rl import llm_judge
from mars_cli.rl.llm_judge import AsyncJudge, VerdictCache, build_messages, cache_key, parse_verdict


class StubJudge:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that grades like a lenient judge.

    Verdict: yes when a reference appears (case-insensitively) inside the candidate, so it
    differs from exact match. A candidate containing "slow" takes `slow` seconds; every
    call takes `latency`. `faults` are used one per request: 500, 400, "timeout", "notag".
    """

    def __init__(self, latency: float = 0.0, slow: float = 0.3):
        self.latency, self.slow = latency, slow
        self.faults: list = []
        self.retry_after = "0"
        self.calls: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    stub.calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    fault = stub.faults.pop(0) if stub.faults else None
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    status, content = stub.answer(body, fault)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]} if status == 200 else {"error": "x"}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if status == 429:
                        self.send_header("Retry-After", stub.retry_after)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def answer(self, body, fault):
        if fault == "timeout":
            time.sleep(1.0)
        if isinstance(fault, int):
            return fault, None
        if isinstance(fault, tuple):  # (status, retry-after seconds)
            self.retry_after = str(fault[1])
            return fault[0], None
        user = body["messages"][1]["content"]
        text = user if isinstance(user, str) else user[-1]["text"]
        refs = re.search(r"Reference answers \(any one is correct\):\n(.*?)\n\n", text, re.S).group(1)
        refs = [r[2:].lower() for r in refs.splitlines()]
        cand = text.split("Candidate answer:\n", 1)[1].lower()
        time.sleep(self.latency + (self.slow if "slow" in cand else 0.0))
        if fault == "notag":
            return 200, "I think it is right."
        ok = any(r in cand for r in refs)
        if "<grade>" in body["messages"][0]["content"]:
            grade = "not_attempted" if "don't know" in cand else "correct" if ok else "incorrect"
            return 200, f"Reasoning... <grade>{grade}</grade>"
        return 200, f"The format is <verdict>yes</verdict> or no. <verdict>{'yes' if ok else 'no'}</verdict>"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def judge_once(stub, *args, cache=None, api_key=None, **kw):
    async def go():
        async with AsyncJudge(stub.url, "stub-model", api_key=api_key, timeout=0.5, retries=2, backoff=0.01, cache=cache) as j:
            return await j.judge(*args, **kw)

    return asyncio.run(go())


def test_build_messages_carries_the_case():
    msgs = build_messages("What bird?", ["kingfisher", "alcedo"], "a kingfisher")
    assert msgs[0]["role"] == "system" and "<verdict>yes</verdict>" in msgs[0]["content"]
    assert "- kingfisher\n- alcedo" in msgs[1]["content"] and msgs[1]["content"].endswith("a kingfisher")
    with_image = build_messages("q", ["a"], "b", image_url="data:image/jpeg;base64,xx", rubric="simpleqa")
    assert with_image[1]["content"][0] == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,xx"}}
    assert "not_attempted" in with_image[0]["content"]


@pytest.mark.parametrize(
    "raw, rubric, want",
    [
        ("<verdict>yes</verdict>", "binary", ("yes", 1.0)),
        ("format: <verdict>yes</verdict>; final <verdict> NO </verdict>", "binary", ("no", 0.0)),
        ("yes", "binary", (None, None)),
        ("<grade>correct</grade>", "simpleqa", ("correct", 1.0)),
        ("<grade>Not attempted</grade>", "simpleqa", ("not_attempted", 0.0)),
        ("<grade>incorrect</grade>", "simpleqa", ("incorrect", 0.0)),
        ("<verdict>yes</verdict>", "simpleqa", (None, None)),
    ],
)
def test_parse_verdict(raw, rubric, want):
    assert parse_verdict(raw, rubric) == want


def test_cache_key_covers_model_prompt_and_case():
    base = cache_key("m", "binary-v1", "q", ["g"], "p")
    assert base == cache_key("m", "binary-v1", "q", ["g"], "p")
    others = [cache_key("m2", "binary-v1", "q", ["g"], "p"), cache_key("m", "binary-v2", "q", ["g"], "p"),
              cache_key("m", "binary-v1", "q2", ["g"], "p"), cache_key("m", "binary-v1", "q", ["g2"], "p"),
              cache_key("m", "binary-v1", "q", ["g"], "p2"), cache_key("m", "binary-v1", "q", ["g"], "p", "img.jpg")]
    assert len({base, *others}) == 7


def test_verdict_cache_persists(tmp_path):
    c = VerdictCache(tmp_path / "c")
    c.put("k", "yes", "<verdict>yes</verdict>")
    c.close()
    c2 = VerdictCache(tmp_path / "c")
    assert c2.get("k") == ("yes", "<verdict>yes</verdict>") and c2.get("other") is None
    assert (tmp_path / "c" / "judge.sqlite").exists()


def test_judge_against_stub_sends_key_as_header_only():
    with StubJudge() as stub:
        v = judge_once(stub, "Where?", ["Paris"], "in paris, france", api_key="sk-secret")
        assert (v.accuracy, v.verdict, v.error) == (1.0, "yes", None)
        call = stub.calls[0]
        assert call["path"] == "/v1/chat/completions" and call["auth"] == "Bearer sk-secret"
        assert call["body"]["model"] == "stub-model" and call["body"]["temperature"] == 0.0
        assert "sk-secret" not in json.dumps(call["body"])
        assert judge_once(stub, "Where?", ["Paris"], "Lyon").accuracy == 0.0
        assert judge_once(stub, "Q", ["Paris"], "I don't know", rubric="simpleqa").verdict == "not_attempted"


def test_retries_server_errors_then_succeeds():
    with StubJudge() as stub:
        stub.faults += [500, 503]
        v = judge_once(stub, "q", ["a"], "a b")
        assert v.accuracy == 1.0 and len(stub.calls) == 3


def test_retry_after_is_honoured():
    with StubJudge() as stub:
        stub.faults += [(429, 0.4)]
        t = time.perf_counter()
        v = judge_once(stub, "q", ["a"], "a b")
        assert v.accuracy == 1.0 and len(stub.calls) == 2
        assert time.perf_counter() - t >= 0.4  # backoff alone would wait at most 0.01 s
    assert llm_judge._retry_after("120") == 30.0 and llm_judge._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_failures_become_errors_not_exceptions():
    with StubJudge() as stub:
        stub.faults += [400]
        v = judge_once(stub, "q", ["a"], "a")
        assert v.accuracy is None and "HTTP 400" in v.error and len(stub.calls) == 1  # no retry on 4xx
        stub.faults += ["timeout"] * 3
        v = judge_once(stub, "q", ["a"], "a")
        assert v.accuracy is None and "timed out" in v.error and "3 attempts" in v.error
        stub.faults += ["notag"]
        v = judge_once(stub, "q", ["a"], "a")
        assert v.accuracy is None and v.raw == "I think it is right." and "no verdict tag" in v.error
    v = judge_once(stub, "q", ["a"], "a")  # server gone
    assert v.accuracy is None and "request failed" in v.error


def test_cache_makes_rejudging_free(tmp_path):
    cache = VerdictCache(tmp_path)
    with StubJudge() as stub:
        first = judge_once(stub, "q", ["a"], "a b", cache=cache)
        again = judge_once(stub, "q", ["a"], "a b", cache=cache)
        assert len(stub.calls) == 1
        assert (again.accuracy, again.verdict, again.cached, first.cached) == (1.0, "yes", True, False)
        stub.faults += ["notag"]
        judge_once(stub, "q", ["a"], "other", cache=cache)  # failures are not cached
        judge_once(stub, "q", ["a"], "other", cache=cache)
        assert len(stub.calls) == 3


def test_image_is_sent_as_small_data_url(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (3000, 1500), (200, 10, 10)).save(p)
    url = llm_judge.image_data_url(str(p))
    assert url.startswith("data:image/jpeg;base64,")
    import io

    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert im.size == (1024, 512)
    with StubJudge() as stub:
        judge_once(stub, "q", ["a"], "a", image=str(p))
        part = stub.calls[0]["body"]["messages"][1]["content"][0]
        assert part["image_url"]["url"] == url
        v = judge_once(stub, "q", ["a"], "a", image=str(tmp_path / "missing.png"))
        assert v.accuracy is None and "missing.png: no such file" in v.error
