"""Run a server: bind, load the policy (503 meanwhile), serve until SIGINT/SIGTERM, clean up.

One event loop owns everything: the listening socket, one task per connection, the
backend's batcher or child process. On SIGTERM/SIGINT the server stops accepting, logs
how many requests are in flight and gives them up to `drain_timeout` seconds to finish
(a second signal ends the wait), then cancels what is left (a generation in progress
ends at its next token), closes its connections and the backend (its worker thread
joined, its child stopped), so nothing outlives the command. Nothing it logs is a
traceback: an unexpected error is one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading

from mars_cli.errors import MarsError, UsageError
from mars_cli.streams import RedactingFormatter
from mars_cli.serve.app import App
from mars_cli.serve.http import HTTPServer

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DRAIN_TIMEOUT = 30.0  # seconds in-flight requests get to finish after SIGTERM/SIGINT
log = logging.getLogger("mars.serve")


def check_exposure(host: str, api_key: str | None) -> None:
    """Any address but loopback needs a key: the server can load any checkpoint it is told to."""
    if host not in LOCAL_HOSTS and not api_key:
        raise UsageError(f"--host {host} exposes the server beyond this machine: set MARS_SERVE_API_KEY "
                         "in the environment (clients send it as Authorization: Bearer …)")


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def setup_logging(quiet: bool = False) -> None:
    logger = logging.getLogger("mars.serve")
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(RedactingFormatter("mars serve: %(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _log_loop_error(loop, context) -> None:
    err = context.get("exception")
    log.error("%s%s", context.get("message", "error"), f": {type(err).__name__}: {err}" if err else "")


async def serve_forever(app: App, policy: str, *, host: str, port: int, api_key: str | None, max_body: int,
                        on_ready=None, stop: asyncio.Event | None = None, drain_timeout: float = DRAIN_TIMEOUT,
                        max_connections: int = 256, read_timeout: float = 60.0) -> None:
    """Serve `app` until `stop` is set (or a signal arrives); `on_ready(url, app)` once the policy is loaded."""
    stop = stop or asyncio.Event()
    hurry = asyncio.Event()  # a second signal: stop waiting for in-flight requests
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_log_loop_error)

    def on_signal():
        (hurry if stop.is_set() else stop).set()

    signals = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            signals.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
            pass
    server = HTTPServer(app.routes(), api_key=api_key, max_body=max_body, max_connections=max_connections,
                        read_timeout=read_timeout)
    try:
        bound = await server.start(host, port)
        url = url_of(host, bound)
        log.info("listening on %s; loading %s (/health answers 503 until it is loaded)", url, policy)
        loading = asyncio.create_task(app.start(policy), name="mars-serve-load")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
        else:
            loading.result()  # a failed load ends the command with its error
            log.info("ready: %s (%s), weight version %d at %s", app.path, app.fingerprint, app.weight_version, url)
            if on_ready is not None:
                on_ready(url, app)
            await stopping
            await _drain(server, drain_timeout, hurry)
        log.info("shutting down")
    finally:
        for t in (locals().get("stopping"), locals().get("loading")):
            if t is not None and not t.done():
                t.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.close()
        await app.backend.close()


async def _drain(server: HTTPServer, timeout: float, hurry: asyncio.Event) -> None:
    server.stop_accepting()
    n = server.in_flight
    if not n:
        return
    log.info("finishing %d in-flight request%s (up to %.0f s; a second signal stops now)", n, "s" * (n != 1), timeout)
    waiting = asyncio.ensure_future(server.drain(timeout))
    hurried = asyncio.ensure_future(hurry.wait())
    await asyncio.wait({waiting, hurried}, return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    left = server.in_flight
    if not waiting.done():
        waiting.cancel()
    if left:
        log.warning("%d request%s still in flight: cut off (their generations end now)", left, "s" * (left != 1))


def run(app: App, policy: str, **kw) -> None:
    try:
        asyncio.run(serve_forever(app, policy, **kw))
    except KeyboardInterrupt:
        pass
    except MarsError:
        raise
    except OSError as e:
        raise MarsError(str(e)) from None


@contextlib.contextmanager
def in_thread(app: App, policy: str, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
              max_body: int = 256 << 20, timeout: float = 300.0, **kw):
    """A server on a thread of its own, for tests and benchmarks: yields its URL once ready; joined on exit."""
    started = threading.Event()
    box: dict = {}

    def ready(url, _app):
        box["url"] = url
        started.set()

    async def main():
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await serve_forever(app, policy, host=host, port=port, api_key=api_key, max_body=max_body,
                            on_ready=ready, stop=box["stop"], **kw)

    def target():
        try:
            asyncio.run(main())
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            started.set()

    thread = threading.Thread(target=target, name="mars-serve", daemon=True)
    thread.start()
    try:
        if not started.wait(timeout) or "error" in box:
            raise box.get("error") or MarsError(f"server not ready within {timeout:.0f} s")
        yield box["url"]
    finally:
        if "loop" in box and thread.is_alive():
            box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(timeout)
