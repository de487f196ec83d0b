"""A small asyncio HTTP/1.1 server (h11) for JSON APIs: bounded bodies, timeouts, one owner.

Every connection is a task the server keeps and cancels on `close()`; handlers are
coroutines `async (Request) -> (status, dict)`. What it enforces before a handler runs:
the bearer key (when one is set, on every path), a declared or streamed body over
`max_body` (413, connection closed), a client that stalls while sending (408) and an
idle keep-alive connection (closed after `idle_timeout`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import h11

from mars_cli.errors import MarsError

log = logging.getLogger("mars.serve")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""
    state: dict = field(default_factory=dict)

    def json(self):
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None

    def arg(self, name: str, default: str | None = None) -> str | None:
        vals = self.query.get(name)
        return vals[-1] if vals else default


class HTTPError(Exception):
    """An answer other than 200: `status` and a message for the `error` field."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


Handler = Callable[[Request], Awaitable[tuple[int, dict]]]


def error_body(status: int, message: str, kind: str = "BadRequestError") -> dict:
    """vLLM's ErrorResponse shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class HTTPServer:
    def __init__(self, routes: dict[tuple[str, str], Handler], *, api_key: str | None = None,
                 max_body: int = 64 << 20, read_timeout: float = 60.0, idle_timeout: float = 120.0):
        self.routes = routes
        self._key = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; the port actually bound (port 0 picks a free one). A taken port is a MarsError."""
        try:
            self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        except OSError as e:
            raise MarsError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                            + (" (is another server running there? pick another --port)" if e.errno in (98, 48) else ""))
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except (asyncio.CancelledError, ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError, OSError):
                pass

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self._key is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(hashlib.sha256(token.encode()).digest(), self._key)

    async def _serve(self, reader, writer) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 << 10)
        while True:
            req, status, body = await self._read_request(conn, reader)
            if req is None and status is None:
                return  # the client closed, or stayed idle too long
            if status is None:
                status, body = await self._dispatch(req)
            keep = await self._respond(conn, writer, status, body)
            if not keep or conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(self, conn, reader):
        """(Request, None, None) to dispatch; (None, status, body) to refuse; (None, None, None) when done."""
        req = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                timeout = self.idle_timeout if req is None else self.read_timeout
                try:
                    data = await asyncio.wait_for(reader.read(65536), timeout)
                except asyncio.TimeoutError:
                    if req is None:
                        return None, None, None
                    return None, 408, error_body(408, "request body not received in time", "TimeoutError")
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None, None, None
            if isinstance(event, h11.Request):
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
                parts = urlsplit(event.target.decode("latin-1"))
                req = Request(event.method.decode(), parts.path, parse_qs(parts.query), headers)
                if not self._authorized(headers):
                    return None, 401, error_body(401, "missing or wrong API key (Authorization: Bearer …)", "Unauthorized")
                declared = headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                    return None, 413, error_body(413, f"request body of {declared} bytes is over the server's "
                                                      f"limit of {self.max_body}", "PayloadTooLarge")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    return None, 413, error_body(413, f"request body over the server's limit of {self.max_body} bytes",
                                                 "PayloadTooLarge")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                req.body = b"".join(chunks)
                return req, None, None

    async def _dispatch(self, req: Request) -> tuple[int, dict]:
        handler = self.routes.get((req.method, req.path))
        if handler is None:
            if any(path == req.path for _, path in self.routes):
                return 405, error_body(405, f"{req.method} not allowed on {req.path}", "MethodNotAllowed")
            return 404, error_body(404, f"no such endpoint: {req.path}", "NotFoundError")
        try:
            return await handler(req)
        except HTTPError as e:
            return e.status, error_body(e.status, e.message, e.kind)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in a handler must not take the server down
            log.exception("%s %s failed", req.method, req.path)
            return 500, error_body(500, f"{type(e).__name__}: {e}", "InternalServerError")

    async def _respond(self, conn, writer, status: int, body: dict) -> bool:
        payload = json.dumps(body, allow_nan=False).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        refused = status in (401, 408, 413)  # the rest of the body is not read: close after answering
        if refused:
            headers.append(("Connection", "close"))
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=payload)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return not refused
