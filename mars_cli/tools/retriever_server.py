"""`mars search --serve`: a local index behind the Search-R1 retrieval-server protocol.

    POST /retrieve  {"queries": ["…", …], "topk": 3, "return_scores": true}
      → {"result": [[{"document": {"id", "title", "text", "contents"}, "score"}, …], …]}
      (one list per query; without return_scores each list holds the documents themselves;
      a `topk` of 0 or null means the server's default, as in Search-R1)
    GET /health     → {"status": "ok", "url", "index", "passages", "method", "model"}

`contents` is the FlashRAG/Search-R1 corpus form, the quoted title on the first line and
the text after it; `title` and `text` are its two parts, as Search-R1's BM25 server
gives them. Search-R1, verl's search tool, SenseNova-MARS's training stack and mars's own
`retriever` backend all read it unchanged. The model stays loaded: each request costs
one query embedding and two index lookups. Bound to 127.0.0.1 unless told.

Concurrency and bounds. One thread per connection, at most `max_connections` at once:
further clients wait in the listen backlog (`BACKLOG`, not the socket module's 5), and
are served as connections close. The index is only read, so requests share it freely.
A request must arrive whole within `request_timeout` seconds of its first byte, and a
kept-alive connection may sit idle `idle_timeout` seconds: a client that sends slowly or
stops half-way loses its connection and its thread. Bad input (invalid or too deeply
nested JSON, a number too long to convert, wrong fields) is a 400 with one line; a
client that leaves early is logged at debug level; no request prints a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mars_cli.errors import MarsError
from mars_cli.strictjson import loads_request

log = logging.getLogger("mars.retriever")
MAX_BODY = 1 << 20
MAX_QUERIES = 512
MAX_TOPK = 100
MAX_CONNECTIONS = 64
BACKLOG = 1024
REQUEST_TIMEOUT = 30.0
IDLE_TIMEOUT = 5.0


def contents(p: dict) -> str:
    return f"\"{p['title']}\"\n{p['text']}" if p.get("title") else p["text"]


class _DeadlineReader(io.RawIOBase):
    """Socket reads bounded by the request's deadline, not per read: a trickle is cut off."""

    def __init__(self, sock, handler):
        self._sock, self._handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        h = self._handler
        wait = h.server.idle_timeout if h.deadline is None else h.deadline - time.monotonic()
        if wait <= 0:
            raise TimeoutError(f"request not complete within {h.server.request_timeout:g} s")
        self._sock.settimeout(wait)
        n = self._sock.recv_into(buf)
        if h.deadline is None and n:  # the request's first bytes: its clock starts
            h.deadline = time.monotonic() + h.server.request_timeout
        return n


class _Handler(BaseHTTPRequestHandler):
    server_version = "mars-retriever"
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.deadline: float | None = None
        self.rfile.close()  # the plain socket file: replaced by one that keeps the deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self), 1 << 16)

    def handle_one_request(self):
        self.deadline = None  # idle until the next request's first byte
        super().handle_one_request()

    def log_message(self, fmt, *args):  # the default writes every request to stderr
        log.debug("%s " + fmt, self.client_address[0], *args)

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.connection.settimeout(self.server.request_timeout)  # a client that never reads is let go
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _guarded(self, work) -> None:
        """Run a route; a client gone or too slow ends the connection, a bug is a one-line 500."""
        try:
            work()
        except TimeoutError as e:
            self.close_connection = True
            log.debug("%s: %s", self.client_address[0], e)
            self._try_send(408, {"error": str(e)})
        except ConnectionError as e:  # left before the answer: nobody to tell
            self.close_connection = True
            log.debug("%s: %s", self.client_address[0], type(e).__name__)
        except Exception as e:  # noqa: BLE001 - a bug must not print a traceback or hang the client
            self.close_connection = True
            log.error("%s %s: %s: %s", self.command, self.path, type(e).__name__, e)
            self._try_send(500, {"error": f"internal error ({type(e).__name__})"})

    def _try_send(self, code: int, body: dict) -> None:
        try:
            self._send(code, body)
        except OSError:
            pass

    def do_GET(self):
        self._guarded(self._get)

    def do_POST(self):
        self._guarded(self._post)

    def _get(self):
        if self.path.split("?")[0].rstrip("/") != "/health":
            return self._send(404, {"error": f"no such path {self.path!r} (POST /retrieve, GET /health)"})
        self._send(200, {"status": "ok", **self.server.describe()})

    def _post(self):
        if self.path.split("?")[0].rstrip("/") != "/retrieve":
            self.close_connection = True  # the body is left unread
            return self._send(404, {"error": f"no such path {self.path!r} (POST /retrieve)"})
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY:
            self.close_connection = True
            return self._send(413 if n > MAX_BODY else 400, {"error": f"body must have a Content-Length of at most {MAX_BODY} bytes"})
        body = self.rfile.read(n)
        if len(body) < n:
            raise ConnectionResetError("the body ended early")
        req, err = _parse(body)
        err = err or _check(req)
        if err:
            return self._send(400, {"error": err})
        k = req.get("topk") or self.server.default_k  # 0 or null: the default, as Search-R1 does
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
            doc = {"id": p["id"], "title": p.get("title") or "", "text": p["text"], "contents": contents(p)}
            out.append({"document": doc, "score": score} if scores else doc)
        return out


def _parse(body: bytes):
    """(the request, None) or (None, why it is not JSON): strictjson's request rules, as mars serve reads."""
    try:
        return loads_request(body or b"null"), None
    except ValueError as e:  # invalid JSON, not UTF-8, too deep, NaN/Infinity, an integer over 64 bits
        return None, f"invalid JSON: {str(e).split(';')[0]}"


def _check(req) -> str | None:
    if not isinstance(req, dict):
        return "expected a JSON object {\"queries\": [...], \"topk\": N, \"return_scores\": bool}"
    q = req.get("queries")
    if not isinstance(q, list) or not all(isinstance(x, str) for x in q):
        return "'queries' must be a list of strings"
    if len(q) > MAX_QUERIES:
        return f"at most {MAX_QUERIES} queries per request"
    k = req.get("topk")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOPK):
        return f"'topk' must be an integer from 0 (the default) to {MAX_TOPK}"
    if not isinstance(req.get("return_scores", False), bool):
        return "'return_scores' must be true or false"
    return None


class _Once:
    """A call that takes effect once, whichever thread makes it first."""

    def __init__(self, fn):
        self._fn, self._lock = fn, threading.Lock()

    def __call__(self) -> None:
        if self._lock.acquire(blocking=False):
            self._fn()


class RetrieverServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, index, *, host: str = "127.0.0.1", port: int = 8001, method: str | None = None, default_k: int = 3,
                 max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT):
        self.index = index
        self.method = method or ("hybrid" if index.dense is not None else "bm25")
        self.default_k = default_k
        self.request_timeout, self.idle_timeout = request_timeout, idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._release: dict = {}  # request -> its slot's one release
        self._closing = threading.Event()
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise MarsError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def describe(self) -> dict:
        """What /health and the ready line say: where, which index, how it ranks."""
        ix = self.index
        model = (ix.manifest.get("dense") or {}).get("model") if self.method != "bm25" else None
        return {"url": f"{self.url}/retrieve", "index": str(ix.path), "passages": ix.n, "method": self.method, "model": model}

    def process_request(self, request, client_address):
        # At capacity the accept loop waits here; new clients queue in the listen backlog.
        while not self._slots.acquire(timeout=0.2):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        # The slot is released once, by the request's thread or, if none started, here. A
        # Ctrl-C can land after the thread started (inside Thread.start's wait): releasing
        # twice raised ValueError, which replaced the KeyboardInterrupt and kept serving.
        release = self._release[request] = _Once(self._slots.release)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release.pop(request, release)()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release.pop(request, _Once(lambda: None))()

    def handle_error(self, request, client_address):
        """One line per failed connection (the default prints a traceback to stderr)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("%s: %s", client_address[0], type(exc).__name__)
        else:
            log.error("%s: %s: %s", client_address[0], type(exc).__name__, exc)

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()

    def start(self) -> threading.Thread:
        """Serve on a background thread (tests); `shutdown()` stops it."""
        t = threading.Thread(target=self.serve_forever, name="mars-retriever", daemon=True)
        t.start()
        return t
