"""`mars search --serve`: a local index behind the Search-R1 retrieval-server protocol.

    POST /retrieve  {"queries": ["…", …], "topk": 3, "return_scores": true}
      → {"result": [[{"document": {"id", "contents"}, "score"}, …], …]}   (one list per query)
      (without return_scores each list holds the documents themselves)
    GET /health     → {"status": "ok", "index", "passages", "method", "model"}

`contents` is the FlashRAG/Search-R1 corpus form, the quoted title on the first line and
the text after it, so Search-R1, verl's search tool, SenseNova-MARS's training stack, and
mars's own `retriever` backend all read it unchanged. The model stays loaded: each
request costs one query embedding and two index lookups. Bound to 127.0.0.1 unless told.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mars_cli.errors import MarsError

log = logging.getLogger("mars.retriever")
MAX_BODY = 1 << 20
MAX_QUERIES = 512
MAX_TOPK = 100


def contents(p: dict) -> str:
    return f"\"{p['title']}\"\n{p['text']}" if p.get("title") else p["text"]


class _Handler(BaseHTTPRequestHandler):
    server_version = "mars-retriever"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # the default writes every request to stderr
        log.debug("%s " + fmt, self.client_address[0], *args)

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.split("?")[0].rstrip("/") != "/health":
            return self._send(404, {"error": f"no such path {self.path!r} (POST /retrieve, GET /health)"})
        ix = self.server.index
        model = (ix.manifest.get("dense") or {}).get("model") if self.server.method != "bm25" else None
        self._send(200, {"status": "ok", "index": str(ix.path), "passages": ix.n, "method": self.server.method, "model": model})

    def do_POST(self):
        if self.path.split("?")[0].rstrip("/") != "/retrieve":
            return self._send(404, {"error": f"no such path {self.path!r} (POST /retrieve)"})
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY:
            self.close_connection = True
            return self._send(413 if n > MAX_BODY else 400, {"error": f"body must have a Content-Length of at most {MAX_BODY} bytes"})
        try:
            req = json.loads(self.rfile.read(n) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._send(400, {"error": f"invalid JSON: {e}"})
        err = _check(req)
        if err:
            return self._send(400, {"error": err})
        k = int(req.get("topk") or self.server.default_k)
        scores = bool(req.get("return_scores", False))
        try:
            result = [self._one(q, k, scores) for q in req["queries"]]
        except MarsError as e:
            return self._send(500, {"error": str(e)})
        self._send(200, {"result": result})

    def _one(self, query: str, k: int, scores: bool) -> list:
        ix = self.server.index
        hits = ix.search(" ".join(query.split()), k, method=self.server.method) if query.strip() else []
        out = []
        for i, score in hits:
            p = ix.passage(i)
            doc = {"id": p["id"], "contents": contents(p)}
            out.append({"document": doc, "score": score} if scores else doc)
        return out


def _check(req) -> str | None:
    if not isinstance(req, dict):
        return "expected a JSON object {\"queries\": [...], \"topk\": N, \"return_scores\": bool}"
    q = req.get("queries")
    if not isinstance(q, list) or not all(isinstance(x, str) for x in q):
        return "'queries' must be a list of strings"
    if len(q) > MAX_QUERIES:
        return f"at most {MAX_QUERIES} queries per request"
    k = req.get("topk")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOPK):
        return f"'topk' must be an integer from 1 to {MAX_TOPK}"
    if not isinstance(req.get("return_scores", False), bool):
        return "'return_scores' must be true or false"
    return None


class RetrieverServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, index, *, host: str = "127.0.0.1", port: int = 8001, method: str | None = None, default_k: int = 3):
        self.index = index
        self.method = method or ("hybrid" if index.dense is not None else "bm25")
        self.default_k = default_k
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise MarsError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        """Serve on a background thread (tests); `shutdown()` stops it."""
        t = threading.Thread(target=self.serve_forever, name="mars-retriever", daemon=True)
        t.start()
        return t
