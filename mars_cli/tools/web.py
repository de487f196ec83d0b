"""HTTP for the search tools: retries with backoff, rate limit, SSRF guard, page text.

Every failure a remote service can produce (timeout, refused connection, 429, 5xx,
malformed JSON, a page too big, a non-text page) becomes a ToolError with a short
message: the agent reads it as the tool's answer and the run goes on.

Pages whose URLs come from search results are untrusted: before fetching one (and each
redirect hop) the host is resolved and every address checked; private, loopback,
link-local, multicast and reserved addresses are refused unless allow_private is set.
The connection then goes to the checked address (Host header and TLS name kept), so a
second DNS answer cannot point it somewhere else.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit, urlunsplit

import orjson

from mars_cli.errors import ToolError

log = logging.getLogger("mars.web")

TEXT_TYPES = ("text/html", "text/plain", "application/xhtml+xml", "application/xml", "text/xml")
RETRY_STATUS = (429, 500, 502, 503, 504)


class RateLimiter:
    """A token bucket: at most `rate` calls per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                wait = (1 - self.tokens) / self.rate
            time.sleep(wait)


def _is_public(addr) -> bool:
    return addr.is_global and not addr.is_multicast


def check_public(url: str, *, allow_private: bool = False) -> str | None:
    """Refuse URLs that are not http(s) or whose host resolves to any non-public address.

    Returns the checked address to connect to (None with allow_private), so the fetch
    can be pinned to it: a second DNS answer (rebinding) never gets a say.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ToolError(f"refusing to fetch {url!r}: only http and https URLs are fetched")
    host = parts.hostname
    if not host:
        raise ToolError(f"refusing to fetch {url!r}: no host")
    if allow_private:
        return None
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80), proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise ToolError(f"cannot resolve {host}: {e}") from None
    addrs = []
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if not _is_public(addr):
            raise ToolError(f"refusing to fetch {url!r}: {host} resolves to non-public address {addr}")
        addrs.append(addr)
    if not addrs:
        raise ToolError(f"cannot resolve {host}: no addresses")
    return str(addrs[0])


def _pinned(url: str, addr: str) -> tuple[str, dict]:
    """The URL with its host replaced by `addr`, and the request options that keep the
    original name for the Host header and for TLS (SNI and certificate checking)."""
    parts = urlsplit(url)
    ip = f"[{addr}]" if ":" in addr else addr
    netloc = ip + (f":{parts.port}" if parts.port else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    opts = {"headers": {"Host": host_header}}
    if parts.scheme == "https":
        opts["extensions"] = {"sni_hostname": parts.hostname}
    return urlunsplit(parts._replace(netloc=netloc)), opts


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass
class HttpClient:
    """One configured HTTP client shared by a backend's threads.

    backoff: seconds before the first retry, doubled each time (tests pass ~0.001);
    max_wait caps both the backoff and a server's Retry-After.
    """

    timeout: float = 20.0
    retries: int = 3
    backoff: float = 0.5
    max_wait: float = 30.0
    max_bytes: int = 2_000_000
    rate_limit: float | None = None
    allow_private: bool = False
    user_agent: str = "mars-search/0.1"
    _client: object = field(default=None, repr=False)
    _limiter: RateLimiter | None = field(default=None, repr=False)

    def __post_init__(self):
        import httpx

        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout), follow_redirects=False, headers={"User-Agent": self.user_agent}
        )
        self._limiter = RateLimiter(self.rate_limit) if self.rate_limit else None

    def _send(self, method: str, url: str, *, what: str, limited: bool = True, **kw):
        """Send with retries; return the httpx response (status < 400), body not yet read.

        `limited` calls count against the rate limit (the paid API); page fetches do not.
        """
        import httpx

        last = "no attempt"
        for attempt in range(self.retries + 1):
            if self._limiter and limited:
                self._limiter.acquire()
            wait = min(self.max_wait, self.backoff * (2**attempt))
            try:
                req = self._client.build_request(method, url, **kw)
                resp = self._client.send(req, stream=True)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g}s"
            except httpx.HTTPError as e:
                last = f"connection failed ({type(e).__name__})"
            else:
                if resp.status_code < 400:
                    return resp
                resp.close()
                last = f"HTTP {resp.status_code}"
                if resp.status_code not in RETRY_STATUS:
                    raise ToolError(f"{what}: {last}")
                hinted = _retry_after(resp.headers.get("Retry-After"))
                if hinted is not None:
                    wait = min(self.max_wait, hinted)
            if attempt < self.retries:
                log.info("%s: %s, retry %d in %.3gs", what, last, attempt + 1, wait)
                time.sleep(wait)
        raise ToolError(f"{what}: {last} (after {self.retries + 1} attempts)")

    def _read_capped(self, resp, what: str) -> bytes:
        chunks, size = [], 0
        try:
            declared = int(resp.headers.get("Content-Length") or 0)
            if declared > self.max_bytes:
                raise ToolError(f"{what}: response too large ({declared} bytes, limit {self.max_bytes})")
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    raise ToolError(f"{what}: response too large (over {self.max_bytes} bytes)")
                chunks.append(chunk)
        except ToolError:
            raise
        except Exception as e:  # a connection cut mid-body is a tool failure, not a crash
            raise ToolError(f"{what}: reading the response failed ({type(e).__name__})") from None
        finally:
            resp.close()
        return b"".join(chunks)

    def request_json(self, method: str, url: str, *, what: str, **kw):
        """Call a JSON API; a body that is not JSON is a ToolError."""
        resp = self._send(method, url, what=what, **kw)
        body = self._read_capped(resp, what)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ToolError(f"{what}: malformed JSON in the response ({len(body)} bytes)") from None

    def get_bytes(self, url: str, *, what: str, untrusted: bool = True, max_redirects: int = 5) -> tuple[bytes, str, str]:
        """Fetch a URL (following redirects, each hop checked); return (body, content type, final URL)."""
        for _ in range(max_redirects + 1):
            target, opts = url, {}
            if untrusted:
                addr = check_public(url, allow_private=self.allow_private)
                if addr is not None:
                    target, opts = _pinned(url, addr)
            resp = self._send("GET", target, what=what, limited=not untrusted, **opts)
            if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                resp.close()
                url = urljoin(url, resp.headers["Location"])
                continue
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            return self._read_capped(resp, what), ctype, url
        raise ToolError(f"{what}: too many redirects")

    def fetch_text(self, url: str, *, max_chars: int = 20_000) -> str:
        """The readable text of a web page (HTML through trafilatura), capped at max_chars."""
        what = f"fetch {url}"
        body, ctype, _ = self.get_bytes(url, what=what)
        if ctype and not ctype.startswith(TEXT_TYPES):
            raise ToolError(f"{what}: not a text page ({ctype})")
        # HTML goes to the extractor as bytes: it reads the page's own charset declaration.
        text = body.decode("utf-8", errors="replace") if ctype == "text/plain" else html_to_text(body)
        text = text.strip()
        if not text:
            raise ToolError(f"{what}: no readable text")
        return text[:max_chars]

    def close(self) -> None:
        self._client.close()


_NO_EXTRACTOR: list[str] = []  # why trafilatura cannot be used here (warned once)


def html_to_text(html: str | bytes) -> str:
    """Main text of an HTML page; falls back to all visible text when extraction finds none.

    trafilatura needs lxml's HTML cleaner, which lxml 6 moved to the separate
    `lxml_html_clean` package (a dependency of mars). Should the import still fail, pages
    are read with the plain-text fallback instead of failing every fetch.
    """
    text = None
    if not _NO_EXTRACTOR:
        try:
            import trafilatura
        except ImportError as e:
            _NO_EXTRACTOR.append(str(e))
            from mars_cli import streams

            streams.warn(f"page text extraction falls back to plain text: cannot import trafilatura ({e}); "
                         "pip install lxml_html_clean")
        else:
            text = trafilatura.extract(html, include_comments=False, include_tables=True, favor_recall=True)
    if text:
        return text
    from lxml import html as lxml_html  # trafilatura depends on lxml

    try:
        tree = lxml_html.fromstring(html)
    except Exception:
        return ""
    for bad in tree.xpath("//script|//style|//noscript"):
        bad.drop_tree()
    return " ".join(tree.text_content().split())
