"""The mars serving API over a backend: request checks, limits, /health, /load, pause/sleep.

Both backends (hf in-process, vLLM behind a child `vllm serve`) sit behind these routes, so
one client speaks to either. The routes and their shapes are vLLM 0.33's where vLLM has
them (see mars_cli.serve); /load and the /health body are mars's. Every /load ends with
the push probe (serve.probe) on the new weights, sent through the backend's generate.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import stat
import time
from pathlib import Path

from mars_cli.errors import MarsError
from mars_cli.serve.http import HTTPError, Request
from mars_cli.serve.lease import TrainerLease

log = logging.getLogger("mars.serve")

PAUSE_MODES = ("abort", "wait", "keep")
# The fields of vLLM's GenerateRequest a client may send through this layer. Others
# (`features` with serialized tensors, KV/EC transfer parameters, derender contexts) are
# for vLLM's disaggregated deployments, not for a policy client, and are refused.
WEIGHT_TRANSFER = ("/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
                   "/finish_weight_update")
GENERATE_FIELDS = {"token_ids", "content_parts", "sampling_params", "request_id", "model", "output_mode", "stream",
                   "cache_salt", "priority", "return_token_ids"}


class Backend:
    """What a backend provides; `App` keeps the state the API reports."""

    engine = "?"
    failure: str | None = None  # set when the backend can no longer serve (e.g. its engine died)
    vocab_size: int = 0
    stats: dict | None = None  # counters /health reports (hf: requests, batches, generated_tokens, busy_seconds)
    pixels: dict | None = None  # {"min", "max"}: the image processor's bounds, so clients count image tokens alike
    image_pad: int = -1
    max_model_len: int | None = None
    load_by_fd: bool = False  # True: load() may read the checkpoint through /proc/self/fd/N (see App._opened)
    sleep_mode: bool = True  # False: /sleep answers 409 (mars serve --sleep-mode off, or a platform without it)

    async def start(self, policy: str) -> dict:  # -> {"path", "fingerprint"}
        raise NotImplementedError

    async def generate(self, body: dict, images: list[bytes]) -> dict:
        raise NotImplementedError

    async def load(self, path: str, version: int) -> dict:
        """Serve `path` as weight `version`: {"path", "fingerprint"}; a MarsError keeps the old weights."""
        raise NotImplementedError

    async def pause(self, mode: str) -> None:
        raise NotImplementedError

    async def resume(self) -> None:
        raise NotImplementedError

    async def sleep(self, level: int) -> None:
        raise NotImplementedError

    async def wake_up(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def decode_image_part(part, i: int, max_image_bytes: int) -> bytes:
    """The bytes of one content part `{"type": "image_url", "url": "data:image/…;base64,…"}`."""
    if not isinstance(part, dict) or part.get("type") != "image_url":
        raise HTTPError(400, f"content_parts[{i}]: only {{'type': 'image_url', 'url': 'data:…'}} parts are accepted")
    url = part.get("url")
    if not isinstance(url, str) or not url.startswith("data:"):
        raise HTTPError(400, f"content_parts[{i}]: images travel in the request body as data: URLs; "
                             "this server opens no paths or URLs")
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
        raise HTTPError(400, f"content_parts[{i}]: expected data:image/…;base64,…")
    if len(data) * 3 // 4 > max_image_bytes:
        raise HTTPError(413, f"content_parts[{i}]: image over the server's limit of {max_image_bytes} bytes",
                        "PayloadTooLarge")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as e:
        raise HTTPError(400, f"content_parts[{i}]: invalid base64: {e}") from None


# Sampling parameters both engines accept, checked here so a bad value is one 400 line on
# either engine: (type check, what is wanted). Engine-specific rules come after, in the backend.
def _number(lo: float, hi: float):
    return lambda v: type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi


def _int_list(v) -> bool:
    return isinstance(v, list) and all(type(t) is int for t in v)


def _bias(v) -> bool:
    return isinstance(v, dict) and all(k.lstrip("-").isdigit() and len(k) < 12 and _number(-100, 100)(x)
                                       for k, x in v.items())


SAMPLING_CHECKS = {
    "temperature": (_number(0, 1e4), "a number from 0 to 10000"),
    "top_p": (_number(0, 1), "a number in (0, 1]"),
    "top_k": (lambda v: type(v) is int and -1 <= v < 1 << 31, "an integer, -1 or 0 for off"),
    "presence_penalty": (_number(-2, 2), "a number from -2 to 2"),
    "frequency_penalty": (_number(-2, 2), "a number from -2 to 2"),
    "repetition_penalty": (_number(1e-3, 100), "a positive number"),
    "max_tokens": (lambda v: type(v) is int and v >= 1, "a positive integer"),
    "min_tokens": (lambda v: type(v) is int and v >= 0, "a non-negative integer"),
    "logprobs": (lambda v: v is None or (type(v) is int and 0 <= v <= 20), "null or an integer from 0 to 20"),
    "stop_token_ids": (lambda v: v is None or _int_list(v), "a list of token ids"),
    "logit_bias": (lambda v: v is None or _bias(v), 'an object {"token id": bias from -100 to 100}'),
    "seed": (lambda v: v is None or (type(v) is int and abs(v) < 1 << 63), "an integer"),
}


def check_sampling(sp) -> dict:
    """`sampling_params` with every known field of the right type and range (a 400 otherwise)."""
    if not isinstance(sp, dict):
        raise HTTPError(400, "sampling_params: a JSON object is required")
    for name, (ok, want) in SAMPLING_CHECKS.items():
        if name in sp and not ok(sp[name]):
            raise HTTPError(400, f"sampling_params.{name}: {want} is required, got {str(sp[name])[:40]}")
    if sp.get("top_p", 1) == 0:
        raise HTTPError(400, "sampling_params.top_p: a number in (0, 1] is required, got 0")
    return sp


class App:
    """State and routes. `policy` is loaded by `start()`; until then /health answers 503."""

    def __init__(self, backend: Backend, *, allow_load: str, max_images: int, max_image_bytes: int,
                 request_timeout: float = 1800.0):
        self.backend = backend
        self.allow_load = Path(allow_load).resolve()
        self.max_images = max_images
        self.max_image_bytes = max_image_bytes
        self.request_timeout = request_timeout
        self.status = "loading"
        self.path: str | None = None
        self.fingerprint: str | None = None
        self.weight_version = 0
        self.last_error: str | None = None
        self.pause_mode = "abort"
        self.started = time.monotonic()
        self._load_lock = asyncio.Lock()
        self._probe_request: dict | None = None  # serve.probe's request, built at the first load
        self.trainer = TrainerLease()  # serve/lease.py: whether a trainer still follows

    def routes(self) -> dict:
        extra = {}
        if hasattr(self.backend, "forward"):
            # vLLM's weight-transfer API (NCCL/IPC from a trainer; no disk, so no --allow-load)
            extra = {("POST", p): self.weight_transfer for p in WEIGHT_TRANSFER}
        from mars_cli.serve.openai_api import OpenAIRoutes

        extra.update(OpenAIRoutes(self).routes())  # /v1: OpenAI's chat and completions (serve/openai_api.py)
        return {**extra,("GET", "/health"): self.health, ("POST", "/inference/v1/generate"): self.generate,
                ("POST", "/load"): self.load, ("POST", "/pause"): self.pause, ("POST", "/resume"): self.resume,
                ("GET", "/is_paused"): self.is_paused, ("POST", "/sleep"): self.sleep,
                ("POST", "/wake_up"): self.wake_up, ("GET", "/is_sleeping"): self.is_sleeping,
                ("GET", "/weight_info"): self.weight_info, ("POST", "/trainer"): self.trainer.post}

    async def start(self, policy: str) -> None:
        info = await self.backend.start(policy)  # weight version 1
        self.weight_version = 1
        self.path, self.fingerprint, self.status = info["path"], info["fingerprint"], "ready"

    def describe(self) -> dict:
        if self.backend.failure:
            self.status, self.last_error = "failed", self.backend.failure
        return {"status": self.status, "engine": self.backend.engine, "policy": self.path,
                "fingerprint": self.fingerprint, "weight_version": self.weight_version,
                "max_images": self.max_images, "max_image_bytes": self.max_image_bytes,
                "max_model_len": self.backend.max_model_len,
                "pixels": self.backend.pixels, "pid": os.getpid(), "last_error": self.last_error,
                "uptime_seconds": round(time.monotonic() - self.started, 3), "trainer": self.trainer.describe(),
                "stats": dict(self.backend.stats) if self.backend.stats is not None else None}

    async def health(self, req: Request):
        return (200 if self.status == "ready" else 503), self.describe()

    async def weight_info(self, req: Request):
        return 200, {"weight_version": str(self.weight_version), "fingerprint": self.fingerprint}

    async def _serving(self) -> None:
        if self.status == "loading" and self.weight_version:
            # a /load in progress: the request waits for it like a queued one (then sees the new weights)
            async with self._load_lock:
                pass
        self.describe()
        if self.status == "paused" and self.pause_mode == "keep":
            return  # vLLM's "keep": accepted and queued until /resume
        if self.status != "ready":
            raise HTTPError(503, f"the server is {self.status}; retry later", "ServiceUnavailableError")

    async def generate(self, req: Request):
        await self._serving()
        # a body's values are bounded before parsing: the prompt's tokens, one per image, and the rest
        limit = self.backend.max_model_len
        body = req.json(max_values=(limit or 1 << 20) + self.max_images + 1024)
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        extra = sorted(set(body) - GENERATE_FIELDS)
        if extra:
            raise HTTPError(400, f"unsupported request fields: {', '.join(extra)}")
        if body.get("output_mode", "tokens") != "tokens" or body.get("stream"):
            raise HTTPError(400, "only output_mode 'tokens' without streaming is served")
        ids = body.get("token_ids")
        if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
            raise HTTPError(400, "token_ids: a non-empty list of integers is required")
        bad = next((t for t in ids if not 0 <= t < self.backend.vocab_size), None)
        if bad is not None:
            raise HTTPError(400, f"token_ids: {bad} is outside the vocabulary (0..{self.backend.vocab_size - 1})")
        if self.backend.max_model_len and len(ids) >= self.backend.max_model_len:
            raise HTTPError(400, f"token_ids: {len(ids)} prompt tokens leave no room in max_model_len "
                                 f"{self.backend.max_model_len}")
        parts = body.get("content_parts") or []
        if not isinstance(parts, list):
            raise HTTPError(400, "content_parts must be a list")
        if len(parts) > self.max_images:
            raise HTTPError(400, f"{len(parts)} images in one request; this server's limit is {self.max_images}")
        images = [decode_image_part(p, i, self.max_image_bytes) for i, p in enumerate(parts)]
        pad = self.backend.image_pad
        if any(a == b == pad for a, b in zip(ids, ids[1:])):
            raise HTTPError(400, "token_ids: two <|image_pad|> side by side read as one image; each image takes "
                                 "its own <|vision_start|><|image_pad|><|vision_end|>")
        pads = sum(1 for t in ids if t == pad)
        if pads != len(images):
            raise HTTPError(400, f"token_ids hold {pads} image placeholders but {len(images)} images were sent "
                                 "(one <|image_pad|> per image)")
        sp = check_sampling(body.get("sampling_params"))
        if sp.get("n", 1) != 1:
            raise HTTPError(400, "sampling_params.n: only 1 is supported (send one request per sample)")
        version, fingerprint = self.weight_version, self.fingerprint
        try:
            out = await asyncio.wait_for(self.backend.generate(body, images), self.request_timeout)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"generation took over {self.request_timeout:.0f} s", "TimeoutError") from None
        # Which weights sampled it: the backend says when it knows better (hf swaps weights
        # between batches); vLLM's load drains in-flight requests first, so there it is the
        # version the request started under.
        out.setdefault("mars", {"weight_version": version, "fingerprint": fingerprint, "policy": self.path})
        return 200, out

    def _inside(self, real: Path) -> bool:
        return real == self.allow_load or self.allow_load in real.parents

    def _outside(self, path) -> HTTPError:
        return HTTPError(403, f"{path}: outside the directory this server may load from ({self.allow_load}); "
                              "start it with --allow-load DIR", "PermissionDenied")

    @contextlib.contextmanager
    def _opened(self, path):
        """(the checkpoint's real path, a path to read it by) for a /load, checked once.

        The directory is opened once and checked where it really is (the kernel's name for
        the open directory), and a backend that can (`load_by_fd`) reads it through that
        open descriptor: swapping a folder on the way for a symlink after the check changes
        nothing. A symlink inside it that leads out of --allow-load is refused.
        """
        if not isinstance(path, str) or not path:
            raise HTTPError(400, "path: a checkpoint directory is required")
        if "\0" in path or len(path) > 4096:
            raise HTTPError(400, "path: not a usable file name (a NUL byte, or over 4096 characters)")
        if not self._inside(Path(os.path.abspath(path)).resolve()):
            raise self._outside(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise HTTPError(400, f"{path}: no such checkpoint directory ({e.strerror})") from None
        try:
            real = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.isdir("/proc/self/fd") else Path(path).resolve()
            if not self._inside(real):
                raise self._outside(path)
            self._check_links(fd, real, path)
            yield real, (f"/proc/self/fd/{fd}" if self.backend.load_by_fd and os.path.isdir("/proc/self/fd")
                         else str(real))
        finally:
            os.close(fd)

    def _check_links(self, fd: int, real: Path, path: str) -> None:
        for top, dirs, files, dfd in os.fwalk(dir_fd=fd):
            for name in dirs + files:
                try:
                    if not stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                        continue
                    target = Path(os.path.realpath(real / top / name))
                except OSError:
                    continue
                if not self._inside(target):
                    raise HTTPError(403, f"{path}: {os.path.normpath(os.path.join(top, name))} is a symlink to "
                                         f"{target}, outside --allow-load {self.allow_load}", "PermissionDenied")

    async def load(self, req: Request):
        body = req.json()
        with self._opened(body.get("path") if isinstance(body, dict) else None) as (path, source):
            return await self._load(path, source)

    async def _load(self, path: Path, source: str):
        async with self._load_lock:
            if self.status == "sleeping":
                # A trainer put the server to sleep to use the GPUs, and now pushes its
                # checkpoint: wake (memory back) and load (vLLM's sleep level 2 + reload).
                try:
                    await self.backend.wake_up()
                except MarsError as e:
                    raise HTTPError(500, f"wake up before the load failed: {e}", "InternalServerError") from None
                self.status = "ready"
            before = self.status
            self.status = "loading"
            t0 = time.time()
            log.info("loading %s (weight version %d → %d)", path, self.weight_version, self.weight_version + 1)
            try:
                if self.backend.load_by_fd:  # read through the open descriptor, named by its real path
                    info = await self.backend.load(source, self.weight_version + 1, real=str(path))
                else:
                    info = await self.backend.load(source, self.weight_version + 1)
            except MarsError as e:
                self.last_error = f"load {path}: {e}"
                self.status = before
                log.error("load failed, still serving %s: %s", self.path, e)
                raise HTTPError(422, f"{path}: {e} (still serving {self.path}, weight version "
                                     f"{self.weight_version})", "LoadError") from None
            except BaseException:
                self.status = before
                raise
            self.weight_version += 1
            self.path, self.fingerprint, self.last_error = info["path"], info["fingerprint"], None
            self.status = "ready" if before == "ready" else before
            seconds = round(time.time() - t0, 3)
            log.info("serving %s (%s), weight version %d, loaded in %.2f s", self.path, self.fingerprint,
                     self.weight_version, seconds)
            probe = await self._probe()
            return 200, {"policy": self.path, "fingerprint": self.fingerprint,
                         "weight_version": self.weight_version, "seconds": seconds, "probe": probe}

    async def _probe(self) -> dict:
        """The push probe (serve.probe) on the weights just loaded; a paused server is not probed."""
        from mars_cli.serve import probe

        if self.status != "ready":
            return {"error": f"not probed: the server is {self.status}"}
        if self._probe_request is None:
            try:
                self._probe_request = await asyncio.to_thread(probe.request_for, self.path)
            except MarsError as e:
                return {"error": f"no probe for this tokenizer: {e}"}
        return await probe.run(self.backend, self._probe_request, self.weight_version)

    async def weight_transfer(self, req: Request):
        """Forwarded to vLLM. /finish_weight_update sets the next weight version; its optional
        `fingerprint` (a mars field, not forwarded) names the weights that were sent."""
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        if req.path != "/finish_weight_update":
            return 200, await self.backend.forward(req.path, body)
        fingerprint = body.pop("fingerprint", None)
        async with self._load_lock:
            body["weight_version"] = str(self.weight_version + 1)
            out = await self.backend.forward(req.path, body)
            self.weight_version += 1
            self.fingerprint = str(fingerprint) if fingerprint else f"transfer-{self.weight_version}"
            log.info("weights received over the transfer API: weight version %d (%s)", self.weight_version,
                     self.fingerprint)
        return 200, {**out, "weight_version": self.weight_version, "fingerprint": self.fingerprint}

    async def pause(self, req: Request):
        mode = req.arg("mode", "abort")
        if mode not in PAUSE_MODES:
            raise HTTPError(400, f"mode must be one of {', '.join(PAUSE_MODES)}")
        if self.status in ("ready", "paused"):
            self.status, self.pause_mode = "paused", mode
        await self.backend.pause(mode)
        return 200, {"status": "paused"}

    async def resume(self, req: Request):
        await self.backend.resume()
        if self.status == "paused":
            self.status = "ready"
        return 200, {"status": "resumed"}

    async def is_paused(self, req: Request):
        return 200, {"is_paused": self.status == "paused"}

    async def sleep(self, req: Request):
        try:
            level = int(req.arg("level", "1"))
        except ValueError:
            level = -1
        if level not in (0, 1, 2):
            raise HTTPError(400, "level must be 0, 1 or 2")
        if not self.backend.sleep_mode:
            raise HTTPError(409, "this server runs without sleep mode (mars serve --sleep-mode on enables it where "
                                 "the platform supports it)", "SleepModeOff")
        async with self._load_lock:
            self.status = "sleeping"
            await self.backend.sleep(level)
        return 200, {"status": "sleeping", "level": level}

    async def wake_up(self, req: Request):
        if not self.backend.sleep_mode:
            return 200, {"status": "awake", "tags": None}  # never asleep
        async with self._load_lock:
            try:
                await self.backend.wake_up()
            except MarsError as e:
                raise HTTPError(500, f"wake up failed: {e}", "InternalServerError") from None
            if self.status == "sleeping":
                self.status = "ready"
        return 200, {"status": "awake", "tags": None}

    async def is_sleeping(self, req: Request):
        return 200, {"is_sleeping": self.status == "sleeping"}
