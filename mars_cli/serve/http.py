"""A small asyncio HTTP/1.1 server (h11) for JSON APIs: bounded bodies, timeouts, one owner.

Every connection is a task the server keeps and cancels on `close()`; handlers are
coroutines `async (Request) -> (status, dict or Streamed)`. What it enforces before a handler runs:
the bearer key (when one is set, on every path; compared as UTF-8 bytes), a declared or
streamed body over `max_body` (413, connection closed), a request not received whole
within `read_timeout` of its first byte (408: a deadline per request, not per read, so a
byte every few seconds cannot hold a connection), at most `max_connections` open
connections (503 to the next one), and an idle keep-alive connection (closed after
`idle_timeout`). While a handler runs, the connection is watched: a client that closes
it cancels its handler (a generation nobody waits for stops). Request bodies are parsed
strictly (strictjson.loads_request: no NaN/Infinity, bounded nesting), and a handler's
failure is one log line and a 500, never a traceback. `drain(timeout)` waits for the
handlers in flight (a graceful shutdown).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import h11

from mars_cli.errors import MarsError
from mars_cli.strictjson import loads_request

log = logging.getLogger("mars.serve")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""
    state: dict = field(default_factory=dict)

    def json(self, max_values: int | None = None):
        """The body's JSON value (strict); `max_values` bounds its list items and fields before parsing."""
        if not self.body:
            return {}
        # Each list item or object field after the first costs a comma: counted in C before
        # parsing, so a body of millions of numbers is refused without building them.
        if max_values is not None and self.body.count(b",") > max_values:
            raise HTTPError(413, f"request body holds more than {max_values} JSON values", "PayloadTooLarge")
        try:
            return loads_request(self.body)
        except ValueError as e:
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


@dataclass
class Streamed:
    """An answer sent while it is produced (server-sent events): its chunks, in order."""

    chunks: AsyncIterator[bytes]
    content_type: str = "text/event-stream"


Handler = Callable[[Request], Awaitable[tuple[int, "dict | Streamed"]]]


def error_body(status: int, message: str, kind: str = "BadRequestError") -> dict:
    """vLLM's ErrorResponse shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class HTTPServer:
    def __init__(self, routes: dict[tuple[str, str], Handler], *, api_key: str | None = None,
                 max_body: int = 64 << 20, read_timeout: float = 60.0, idle_timeout: float = 120.0,
                 max_connections: int = 256):
        self.routes = routes
        self._key = hashlib.sha256(api_key.encode("utf-8")).digest() if api_key else None
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self._handlers: set[asyncio.Task] = set()  # requests in flight

    async def start(self, host: str, port: int) -> int:
        """Listen; the port actually bound (port 0 picks a free one). A taken port is a MarsError."""
        try:
            self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        except OSError as e:
            raise MarsError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                            + (" (is another server running there? pick another --port)" if e.errno in (98, 48) else ""))
        return self._server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    @property
    def in_flight(self) -> int:
        return len(self._handlers)

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` s for the requests in flight to be answered; how many were not."""
        pending = set(self._handlers)
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        return sum(not t.done() for t in pending)

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
        full = len(self._conns) >= self.max_connections
        self._conns.add(task)
        try:
            if full:
                await self._refuse_busy(writer)
                return
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

    async def _refuse_busy(self, writer) -> None:
        payload = json.dumps(error_body(503, f"the server has {self.max_connections} connections open; retry later",
                                        "ServiceUnavailableError")).encode()
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        await asyncio.wait_for(writer.drain(), 5)

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self._key is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        # headers arrive as latin-1 text: back to the bytes the client sent, which hold UTF-8
        return scheme.lower() == "bearer" and secrets.compare_digest(
            hashlib.sha256(token.encode("latin-1")).digest(), self._key)

    async def _serve(self, reader, writer) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 << 10)
        while True:
            req, status, body = await self._read_request(conn, reader)
            if req is None and status is None:
                return  # the client closed, or stayed idle too long
            if status is None:
                status, body = await self._watched(req, conn, reader)
                if status is None:
                    return  # the client left: nobody to answer
            keep = await self._respond(conn, writer, status, body)
            if not keep or conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(self, conn, reader):
        """(Request, None, None) to dispatch; (None, status, body) to refuse; (None, None, None) when done."""
        req = None
        chunks: list[bytes] = []
        size = 0
        deadline = None  # set at the request's first byte: the whole request must arrive by then
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if deadline is None and conn.trailing_data[0]:
                    deadline = time.monotonic() + self.read_timeout
                timeout = self.idle_timeout if deadline is None else deadline - time.monotonic()
                try:
                    data = await asyncio.wait_for(reader.read(65536), max(timeout, 0))
                except asyncio.TimeoutError:
                    if deadline is None:
                        return None, None, None
                    return None, 408, error_body(408, f"request not received whole within {self.read_timeout:.0f} s",
                                                 "TimeoutError")
                if deadline is None and data:
                    deadline = time.monotonic() + self.read_timeout
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

    async def _watched(self, req: Request, conn, reader) -> tuple[int | None, dict | None]:
        """Run the handler while watching the connection: (None, None) when the client closed it."""
        handler = asyncio.ensure_future(self._dispatch(req))
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        watch = asyncio.ensure_future(reader.read(65536))
        try:
            while True:
                await asyncio.wait({handler, watch}, return_when=asyncio.FIRST_COMPLETED)
                if handler.done():
                    return handler.result()
                data = watch.result() if not watch.cancelled() and watch.exception() is None else b""
                if not data:  # EOF or reset: the client is gone
                    handler.cancel()
                    await asyncio.gather(handler, return_exceptions=True)
                    return None, None
                conn.receive_data(data)  # a pipelined next request: kept for the next cycle
                watch = asyncio.ensure_future(reader.read(65536))
        finally:
            if not watch.done():
                watch.cancel()
            if not handler.done():
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)

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
        except Exception as e:  # a bug in a handler must not take the server down (one line, no traceback)
            log.error("%s %s failed: %s: %s", req.method, req.path, type(e).__name__, str(e)[:500])
            return 500, error_body(500, f"{type(e).__name__}: {str(e)[:500]}", "InternalServerError")

    async def _respond(self, conn, writer, status: int, body) -> bool:
        if isinstance(body, Streamed):
            return await self._stream(conn, writer, status, body)
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

    async def _stream(self, conn, writer, status: int, body: Streamed) -> bool:
        """Chunked transfer: each chunk is sent as it comes; a client gone stops the producer."""
        headers = [("Content-Type", body.content_type), ("Cache-Control", "no-cache")]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        try:
            async for chunk in body.chunks:
                writer.write(conn.send(h11.Data(data=chunk)))
                await writer.drain()
        finally:
            close = getattr(body.chunks, "aclose", None)
            if close is not None:
                await close()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True
