"""Servers on 127.0.0.1 that speak the search APIs' JSON shapes and inject faults.

    with FakeServer(serper_routes(hits)) as srv:
        srv.faults += ["timeout", ("status", 429, {"Retry-After": "0"}), "malformed"]
        ...                                   # srv.url, srv.calls

Each queued fault is used by one request (oldest first), then normal answers resume.
Faults: "timeout" (sleep past the client's timeout), ("status", code, headers),
"malformed" (invalid JSON), "empty" (a valid answer with no results), "huge" (a body
far over any size cap), "cut" (a declared length the body never reaches).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def _json(obj, status: int = 200, headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


class _Listener(ThreadingHTTPServer):
    request_queue_size = 128  # concurrency tests connect by the dozen at once (the default is 5)


class FakeServer:
    def __init__(self, routes: dict, *, timeout_sleep: float = 1.0):
        self.routes = routes  # (method, path) -> fn(request dict) -> (status, headers, body)
        self.faults: list = []
        self.calls: list[dict] = []
        self.timeout_sleep = timeout_sleep
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def _handle(self, method):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = {"method": method, "path": parts.path, "query": parse_qs(parts.query),
                       "headers": dict(self.headers), "body": body}
                try:
                    req["json"] = json.loads(body) if body else None
                except ValueError:
                    req["json"] = None
                with server._lock:
                    server.calls.append(req)
                    fault = server.faults.pop(0) if server.faults else None
                status, headers, payload = server._answer(req, fault)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    if "Content-Length" not in headers:
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self._httpd = _Listener(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def _answer(self, req, fault):
        route = self.routes.get((req["method"], req["path"]))
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
        elif isinstance(fault, tuple) and fault[0] == "status":
            return fault[1], fault[2] if len(fault) > 2 else {}, b'{"error": "injected"}'
        elif fault == "malformed":
            return 200, {"Content-Type": "application/json"}, b'{"organic": [ this is not json'
        elif fault == "huge":
            return 200, {"Content-Type": "text/html"}, b"<html><body>" + b"x" * 3_000_000 + b"</body></html>"
        elif fault == "cut":
            return 200, {"Content-Type": "application/json", "Content-Length": "5000"}, b'{"a": 1'
        if route is None:
            return 404, {}, b"not found"
        if fault == "empty":
            req = {**req, "empty": True}
        return route(req)

    def __enter__(self):
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def page_routes(pages: dict[str, str], content_type: str = "text/html") -> dict:
    """GET path -> an HTML (or other) page."""
    return {("GET", p): (lambda req, body=body: (200, {"Content-Type": content_type}, body.encode())) for p, body in pages.items()}


def serper_routes(hits: list[dict], lens: list[dict] | None = None) -> dict:
    """serper.dev: POST /search {"q", "num"} -> {"organic": [{title, link, snippet, position}]}; POST /lens."""
    def search(req):
        if req["headers"].get("X-API-KEY") != "test-key":
            return _json({"message": "Unauthorized."}, 403)
        if req.get("empty"):
            return _json({"searchParameters": req["json"], "organic": []})
        n = req["json"].get("num", 10)
        organic = [{**h, "position": i + 1} for i, h in enumerate(hits[:n])]
        return _json({"searchParameters": req["json"], "organic": organic})

    def lens_search(req):
        if req.get("empty"):
            return _json({"organic": []})
        return _json({"searchParameters": req["json"], "organic": lens or []})

    return {("POST", "/search"): search, ("POST", "/lens"): lens_search}


def searxng_routes(results: list[dict]) -> dict:
    def search(req):
        if req["query"].get("format") != ["json"]:
            return 403, {}, b"format not allowed"
        return _json({"query": req["query"]["q"][0], "results": [] if req.get("empty") else results})

    return {("GET", "/search"): search}


def retriever_routes(docs: list[dict]) -> dict:
    """Search-R1 server: POST /retrieve {"queries", "topk", "return_scores"}."""
    def retrieve(req):
        body = req["json"]
        out = []
        for q in body["queries"]:
            ranked = [] if req.get("empty") else docs[: body["topk"]]
            if body.get("return_scores"):
                out.append([{"document": d, "score": 10.0 - i} for i, d in enumerate(ranked)])
            else:
                out.append(ranked)
        return _json({"result": out})

    return {("POST", "/retrieve"): retrieve}


def openai_routes(reply) -> dict:
    """POST /v1/chat/completions; `reply(prompt) -> str`."""
    def chat(req):
        prompt = req["json"]["messages"][-1]["content"]
        return _json({"id": "x", "object": "chat.completion", "model": req["json"]["model"],
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": reply(prompt)}, "finish_reason": "stop"}]})

    return {("POST", "/v1/chat/completions"): chat}
