"""The `server` engine: token in, token out against `mars serve` URLs (hf or vLLM behind them).

Requests are vLLM 0.33's /inference/v1/generate body: the prompt ids with ONE
<|image_pad|> per image, each image's file bytes as a data: URL content part (the server
opens no paths), sampling with `logprobs: 0` (the sampled token's log-prob, of the
distribution mars_cli.engines defines) and the vision tokens suppressed. Answers give
the sampled ids, their log-probs, the finish reason and which weights sampled them.

Requests go to the live server with the fewest in flight. A server that cannot be
reached, or drops the connection, fails the requests it had ("URL: reason") and is
dropped; a 503 (loading, paused for a weight update, asleep) is waited out, up to the
timeout. `agenerate` raises MarsError once no server is left.

A server is known by its URL without credentials (`mars_cli.urls.public_url`): that form
is what records (`policy.servers`), errors and logs show; a `user:password@` in a --server
URL travels only as the Basic Authorization header of that server's requests.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

from mars_cli.engines import Engine, GenRequest, GenResult, Sampling, never_sampled, stop_ids
from mars_cli.errors import MarsError

log = logging.getLogger("mars.engine")

MIME = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"GIF8": "image/gif", b"RIFF": "image/webp",
        b"BM": "image/bmp", b"II*\x00": "image/tiff", b"MM\x00*": "image/tiff"}
RETRY_503 = 0.5  # seconds between tries while a server is loading or paused


_PARTS: OrderedDict = OrderedDict()  # (path, size, mtime) -> content part; turns resend an episode's images


def image_part(path: str) -> dict:
    """A content part carrying the file's bytes (decoded server-side as mars decodes it here)."""
    p = Path(path)
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    part = _PARTS.get(key)
    if part is None:
        data = p.read_bytes()
        mime = next((m for magic, m in MIME.items() if data.startswith(magic)), "image/png")
        part = {"type": "image_url", "url": f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"}
        _PARTS[key] = part
        while len(_PARTS) > 64:
            _PARTS.popitem(last=False)
    _PARTS.move_to_end(key)
    return part


def generate_body(ids, s: Sampling, max_tokens: int, special: dict, stops=None) -> dict:
    """The /inference/v1/generate body of one turn (images, if any, are added as content parts);
    `stops`: the ids that end it (engines.stop_ids), <|im_end|> alone by default."""
    return {"token_ids": list(ids),
            "sampling_params": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k if s.top_k > 0 else -1,
                                "presence_penalty": s.presence_penalty, "max_tokens": max_tokens,
                                "logprobs": 0, "stop_token_ids": list(stops or [special["im_end"]]), "detokenize": False,
                                "skip_special_tokens": False,
                                "logit_bias": {str(t): -100.0 for t in never_sampled(special)} or None}}


class Dead(Exception):
    """The server is gone (connection refused or dropped): drop it."""


class ServerEngine(Engine):
    name = "server"
    tokens = True

    def __init__(self, policy: str | None, *, sampling: Sampling, urls: list[str], api_key: str | None = None,
                 timeout: float = 600.0, min_pixels: int | None = None, max_pixels: int | None = None, **_):
        import httpx

        from mars_cli.models.load import end_ids, fingerprint, load_image_processor, load_tokenizer, special_ids
        from mars_cli.protocol import Renderer
        from mars_cli.urls import split_credentials

        if not urls:
            raise MarsError("the server engine needs at least one URL (--server URL[,URL…])")
        self.sampling = sampling
        self.timeout = timeout
        api_key = api_key or os.environ.get("MARS_SERVE_API_KEY") or None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._auth: dict[str, dict] = {}  # public URL -> its Basic Authorization header, if any
        for u in urls:
            public, basic = split_credentials(u.rstrip("/"))
            self._auth[public] = {"Authorization": basic} if basic else {}
        self.urls = list(self._auth)
        healths = {}
        with httpx.Client(headers=self.headers, timeout=30.0) as c:
            for url in self.urls:
                healths[url] = _health(c, url, wait=timeout, headers=self._auth[url])
        alive = {u: h for u, h in healths.items() if not isinstance(h, str)}
        for u, h in healths.items():
            if isinstance(h, str):
                log.warning("%s: %s; going on without it", u, h)
        if not alive:
            raise MarsError("no server is serving: " + "; ".join(f"{u}: {h}" for u, h in healths.items()))
        fps = {h["fingerprint"] for h in alive.values()}
        if len(fps) > 1:
            raise MarsError("the servers serve different policies: "
                            + ", ".join(f"{u} {h['fingerprint']}" for u, h in alive.items()))
        first = next(iter(alive.values()))
        self.fingerprint = first["fingerprint"]
        self.path = str(policy) if policy else first["policy"]
        if policy is not None and fingerprint(policy) != self.fingerprint:
            raise MarsError(f"--policy {policy} ({fingerprint(policy)}) is not what the servers serve: "
                            f"{first['policy']} ({self.fingerprint})")
        pixels = first.get("pixels") or {}
        for flag, mine, theirs in (("--min-pixels", min_pixels, pixels.get("min")),
                                   ("--max-pixels", max_pixels, pixels.get("max"))):
            if mine is not None and theirs is not None and int(mine) != int(theirs):
                raise MarsError(f"{flag} {mine} differs from the server's {theirs}: images would be counted wrong; "
                                f"start `mars serve` with {flag} {mine} (a --protocol with image limits, such as "
                                "sensenova-eval, sets them here)")
        tokenizer = load_tokenizer(self.path)
        self.special = special_ids(tokenizer, self.path)
        self.stop = stop_ids(self.special, end_ids(self.path))  # sent in each request
        self.renderer = Renderer(tokenizer, self.special)
        proc = load_image_processor(self.path, min_pixels=pixels.get("min", min_pixels),
                                    max_pixels=pixels.get("max", max_pixels))
        self._images = SimpleNamespace(image_processor=proc)
        self.pixels = {"min": int(proc.size["shortest_edge"]), "max": int(proc.size["longest_edge"])}
        self.image_factor = int(proc.patch_size) * int(proc.merge_size)
        caps = [h.get("max_images") for h in alive.values() if h.get("max_images") is not None]
        self.max_images = min(caps) if caps else None
        self.weight_version = max(int(h.get("weight_version") or 0) for h in alive.values())
        self.alive: dict[str, int] = {u: 0 for u in alive}  # url -> requests in flight
        self.dropped: dict[str, str] = {u: h for u, h in healths.items() if isinstance(h, str)}
        self._order = itertools.count()
        self.trainers: dict[str, dict | None] = {u: h.get("trainer") for u, h in alive.items()}  # serve/lease.py
        self._client = None
        self._client_loop = None

    def describe(self) -> dict:
        return {**super().describe(), "servers": list(self.alive)}

    async def apoll_weight_version(self) -> int | None:
        """The weight version every live server has reached (the lowest of their /health).

        Also notes each server's `trainer` lease in `self.trainers`: whether weights may still come.
        """
        import httpx

        client = self._client_here()
        seen = []
        for url in list(self.alive):
            try:
                r = await client.get(url + "/health", timeout=30.0, headers=self._auth[url])
                body = r.json()
                v = body.get("weight_version")
                self.trainers[url] = body.get("trainer")
            except (httpx.HTTPError, ValueError, AttributeError):
                continue  # an unreachable server is dropped by the request that finds it dead
            if isinstance(v, int):
                seen.append(v)
        if not seen:
            return self.weight_version
        self.weight_version = max(self.weight_version or 0, min(seen))
        return min(seen)

    def image_tokens(self, image: str) -> int:
        from mars_cli.models.inputs import image_tokens

        return int(image_tokens(self._images, image))

    # ---------------------------------------------------------------- requests

    def _body(self, req: GenRequest) -> dict:
        body = generate_body(req.ids, self.sampling, req.max_new_tokens, self.special, self.stop)
        if req.images:
            body["content_parts"] = [image_part(p) for p in req.images]
        return body

    def _client_here(self):
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(headers=self.headers, timeout=httpx.Timeout(self.timeout, connect=10.0),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
            self._client_loop = loop
        return self._client

    def _pick(self) -> str:
        if not self.alive:
            raise MarsError("no server left: " + "; ".join(f"{u}: {r}" for u, r in self.dropped.items()))
        n = next(self._order)
        urls = list(self.alive)
        return min(urls, key=lambda u: (self.alive[u], (urls.index(u) - n) % len(urls)))

    def _drop(self, url: str, reason: str) -> None:
        if url in self.alive:
            del self.alive[url]
            self.dropped[url] = reason
            log.warning("%s: %s; dropped (%d server(s) left)", url, reason, len(self.alive))

    async def agenerate(self, req: GenRequest) -> GenResult:
        """One turn from the least busy server; a failure is GenResult(error="URL: reason")."""
        try:
            body = self._body(req)
        except (OSError, MarsError) as e:
            return GenResult(text="", error=f"image: {e}")
        url = self._pick()
        self.alive[url] += 1
        try:
            return await self._post(url, body)
        except Dead as e:
            self._drop(url, str(e))
            return GenResult(text="", error=f"{url}: {e}")
        finally:
            if url in self.alive:
                self.alive[url] -= 1

    async def _post(self, url: str, body: dict) -> GenResult:
        import httpx

        client = self._client_here()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                r = await client.post(url + "/inference/v1/generate", json=body, headers=self._auth[url])
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                raise Dead(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
            except httpx.TimeoutException:
                return GenResult(text="", error=f"{url}: no answer within {self.timeout:.0f} s")
            if r.status_code == 503 and time.monotonic() < deadline:
                await asyncio.sleep(RETRY_503)  # loading new weights, paused or asleep: wait
                continue
            if r.status_code != 200:
                return GenResult(text="", error=f"{url}: HTTP {r.status_code}: {_message(r)}")
            try:
                out = self._result(r.json())
            except (ValueError, KeyError, TypeError, IndexError) as e:
                return GenResult(text="", error=f"{url}: malformed answer: {e}")
            if out is None:  # aborted by a pause (vLLM's default mode): nothing was kept, ask again
                continue
            return out

    def _result(self, resp: dict) -> GenResult | None:
        c = resp["choices"][0]
        if c.get("finish_reason") == "abort":
            return None
        ids = [int(t) for t in c["token_ids"]]
        content = (c.get("logprobs") or {}).get("content") or []
        if len(content) != len(ids):
            raise ValueError(f"{len(content)} log-probs for {len(ids)} tokens")
        lps = [float(x["logprob"]) for x in content]
        ended = bool(ids) and ids[-1] in self.stop
        body = ids[:-1] if ended else ids
        finish = "length" if c.get("finish_reason") == "length" and not ended else "stop"
        mars = resp.get("mars") or {}
        spans = c.get("weight_versions") or []
        version = mars.get("weight_version")
        if version is None and spans:
            version = min(int(s["version"]) for s in spans)
        if version is not None:
            self.weight_version = max(self.weight_version or 0, int(version))
        fp = mars.get("fingerprint") or self.fingerprint
        if fp != self.fingerprint:  # a pushed checkpoint: records name what sampled them
            self.fingerprint = fp
            self.path = mars.get("policy") or self.path
        return GenResult(text=self.decode(body), ids=ids, logprobs=lps, finish=finish,
                         weight_version=None if version is None else int(version), fingerprint=fp)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """The batch interface of in-process engines: all requests at once, concurrently."""
        async def run():
            try:
                return await asyncio.gather(*(self.agenerate(r) for r in requests))
            finally:
                await self.aclose()

        return list(asyncio.run(run()))

    def lost(self) -> str | None:
        """Why no request can be served any more (None while a server is alive)."""
        if self.alive:
            return None
        return "no server left: " + "; ".join(f"{u}: {r}" for u, r in self.dropped.items())

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client, self._client_loop = self._client, None, None
            await client.aclose()

    def close(self) -> None:
        if self._client is not None:
            try:
                asyncio.run(self.aclose())
            except RuntimeError:
                pass


def _health(client, url: str, wait: float = 600.0, headers: dict | None = None):
    """The /health body, or a string saying why there is none (a loading server is waited for)."""
    import httpx

    deadline = time.monotonic() + wait
    while True:
        try:
            r = client.get(url + "/health", headers=headers)
        except httpx.HTTPError as e:
            return f"unreachable ({type(e).__name__}: {e})"
        if r.status_code == 401:
            return "refused the API key (set MARS_SERVE_API_KEY)"
        try:
            body = r.json()
        except ValueError:
            return f"/health is not a mars server's (HTTP {r.status_code})"
        if not isinstance(body, dict) or "fingerprint" not in body:
            return f"/health is not a mars server's (HTTP {r.status_code})"
        if r.status_code == 200:
            return body
        if body.get("status") == "failed" or time.monotonic() > deadline:
            return f"not serving ({body.get('status')}: {body.get('last_error') or 'HTTP ' + str(r.status_code)})"
        time.sleep(1.0)  # still loading


def _message(r) -> str:
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        return r.text[:200]
    return str(err.get("message") if isinstance(err, dict) else err)[:500]
