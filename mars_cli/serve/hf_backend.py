"""`mars serve --engine hf`: transformers on one device, concurrent requests micro-batched.

One asyncio task (the batcher) takes every request queued at that moment, groups them by
sampling settings and runs each group as ONE left-padded `generate` on the single worker
thread that owns the model; loads and sleep/wake run on that thread too, between batches,
so a batch never sees half-swapped weights and each answer names the weights that made it.
Images arrive as bytes; they are spooled under a content-hash name (mars_cli.spool: held
until the request is answered, so eviction never removes an image a pending request needs)
and decoded by mars's own image code (the code `update` uses), so the pixels are exactly
what training sees. Decodes share the process's pixel budget (images.MARS_DECODE_PIXELS).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mars_cli.engines import Sampling, never_sampled
from mars_cli.errors import MarsError, UsageError
from mars_cli.serve.app import Backend
from mars_cli.serve.http import HTTPError

log = logging.getLogger("mars.serve")

IGNORED = {"detokenize", "skip_special_tokens", "spaces_between_special_tokens", "output_kind", "n"}
SPOOL_FILES = 2048  # spooled images kept (a multi-turn episode resends the same images)
SPOOL_BYTES = 2 << 30  # and their bytes at most (held images may exceed both for a while)


@dataclass
class Pending:
    ids: list[int]
    images: list[str]
    sampling: Sampling
    max_tokens: int
    stop_ids: set
    want_logprobs: bool
    request_id: str
    future: asyncio.Future = field(repr=False, default=None)


class HFBackend(Backend):
    engine = "hf"
    load_by_fd = True

    def __init__(self, *, device: str = "cpu", dtype: str | None = None, max_num_seqs: int = 32,
                 min_pixels: int | None = None, max_pixels: int | None = None, max_model_len: int | None = None,
                 seed: int | None = None, max_image_pixels: int | None = None, spool_bytes: int = SPOOL_BYTES):
        self.device, self.dtype = device, dtype
        self.max_num_seqs = max(1, max_num_seqs)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_model_len = max_model_len
        self.seed = seed
        self.policy = None
        self.model_type: str | None = None  # of the served model, as loaded
        self.serving: tuple = (0, None, None)  # (weight version, fingerprint, path), set on the worker
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="mars-serve-hf")
        self.max_image_pixels = max_image_pixels
        self._spool_bytes = spool_bytes
        self._spool = None  # made by start(): a constructed backend leaves no folder behind
        self._queue: asyncio.Queue | None = None
        self._running = asyncio.Event()
        self._busy = 0  # requests taken by the batcher and not answered yet
        self._idle = asyncio.Event()
        self._batcher: asyncio.Task | None = None
        self._asleep: int | None = None
        self._closing = False  # set by close(): a generation in progress ends at its next token
        self.stats = {"requests": 0, "batches": 0, "generated_tokens": 0, "busy_seconds": 0.0}

    async def _on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _load(self, path: str, version: int, real: str | None = None):
        from mars_cli.models.load import load_policy

        policy = load_policy(path, device=self.device, dtype=self.dtype, min_pixels=self.min_pixels,
                             max_pixels=self.max_pixels)
        if real is not None:
            policy.path = real  # read through a descriptor (App._opened): named by where it really is
        old, self.policy = self.policy, policy
        self.model_type = getattr(policy.model.config, "model_type", None)
        self.serving = (version, policy.fingerprint, policy.path)
        del old
        _free_memory(self.device)
        return policy

    async def start(self, policy: str) -> dict:
        if self.seed is not None:
            import torch

            torch.manual_seed(self.seed)
        try:
            p = await self._on_worker(self._load, policy, 1)
        except MarsError:
            raise
        except Exception as e:  # whatever the loader raised (a corrupt safetensors header…)
            raise MarsError(f"{policy}: cannot load it: {type(e).__name__}: {e}") from None
        self.vocab_size = int(p.model.get_output_embeddings().weight.shape[0])
        self.image_pad = p.special["image_pad"]
        if self.max_model_len is None:  # the model's own context length, as vLLM takes it
            from mars_cli.models.load import context_length

            self.max_model_len = context_length(p.model)
        size = p.image_processor.size
        self.pixels = {"min": int(size["shortest_edge"]), "max": int(size["longest_edge"])}
        from mars_cli.spool import Spool

        self._spool = Spool(max_bytes=self._spool_bytes, max_files=SPOOL_FILES)
        self._queue = asyncio.Queue()
        self._running.set()
        self._idle.set()
        self._batcher = asyncio.create_task(self._batch_loop(), name="mars-serve-batcher")
        return {"path": p.path, "fingerprint": p.fingerprint}

    async def load(self, path: str, version: int, real: str | None = None) -> dict:
        from mars_cli.models.load import read_config

        cfg = read_config(path)
        # against the served model's type as loaded: its folder may be gone (update --keep-last)
        if cfg.get("model_type") != self.model_type:
            raise MarsError(f"model_type {cfg.get('model_type')!r} is not the served policy's {self.model_type!r}")
        try:
            p = await self._on_worker(self._load, path, version, real)
        except MarsError:
            raise
        except Exception as e:  # whatever the loader raised (a corrupt safetensors header…): the old model stays
            raise MarsError(f"cannot load it: {type(e).__name__}: {e}") from None
        return {"path": p.path, "fingerprint": p.fingerprint}

    # ---------------------------------------------------------------- requests

    def _parse(self, body: dict) -> Pending:
        sp = dict(body["sampling_params"])
        unknown = sorted(set(sp) - IGNORED - {"temperature", "top_p", "top_k", "presence_penalty", "max_tokens",
                                             "logprobs", "stop_token_ids", "logit_bias", "seed"})
        if unknown:
            raise HTTPError(400, f"sampling_params: {', '.join(unknown)} not supported by the hf engine")
        if sp.get("seed") is not None:
            raise HTTPError(400, "sampling_params.seed: the hf engine has one seed (mars serve --seed)")
        top_k = sp.get("top_k", 0)
        try:
            s = Sampling(temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
                         top_k=0 if top_k in (-1, None) else int(top_k),
                         presence_penalty=float(sp.get("presence_penalty", 0.0)))
        except (UsageError, TypeError, ValueError) as e:
            raise HTTPError(400, f"sampling_params: {e}") from None
        eos = self.policy.special["im_end"]
        # app.check_sampling: a list of ints; as in vLLM, the checkpoint's own end ids end it too
        asked = sp.get("stop_token_ids") or []
        if any(not 0 <= t < self.vocab_size for t in asked):
            raise HTTPError(400, f"sampling_params.stop_token_ids: ids run from 0 to {self.vocab_size - 1}")
        stops = {eos, *self.policy.end_ids, *asked}
        suppressed = set(never_sampled(self.policy.special))
        for k, v in (sp.get("logit_bias") or {}).items():  # app.check_sampling: {"digits": number}
            if int(k) not in suppressed or v > -100:
                raise HTTPError(400, "sampling_params.logit_bias: the hf engine only suppresses the vision tokens")
        max_tokens = sp.get("max_tokens")
        if type(max_tokens) is not int or max_tokens < 1:
            raise HTTPError(400, "sampling_params.max_tokens: a positive integer is required")
        n = len(body["token_ids"])
        if self.max_model_len and n + max_tokens > self.max_model_len:
            max_tokens = self.max_model_len - n  # as vLLM: the turn ends "length" at the context limit
        return Pending(ids=list(body["token_ids"]), images=[], sampling=s, max_tokens=max_tokens, stop_ids=stops,
                       want_logprobs=sp.get("logprobs") is not None,
                       request_id=str(body.get("request_id") or uuid.uuid4().hex))

    def _spool_image(self, data: bytes, i: int) -> str:
        """Spool and decode one image (a bad one fails its request only); held until released."""
        from mars_cli import images

        path = self._spool.hold(data, ".img")
        try:
            arr = images.load_array(str(path), max_image_pixels=self.max_image_pixels)
            big = arr.size > 3 * 16_000_000
            del arr
            if big:
                _trim_heap()
        except MarsError as e:
            self._spool.discard(path)  # refused: its bytes go now, not at the next eviction
            raise HTTPError(400, f"content_parts[{i}]: {str(e).replace(str(path), 'image')}") from None
        except BaseException:
            self._spool.release(path)
            raise
        return str(path)

    def _image_tokens(self, paths: list[str]) -> int:
        from mars_cli.models.inputs import image_tokens

        return sum(int(image_tokens(self.policy, p)) for p in paths)

    def _fit(self, item: Pending, image_tokens: int) -> None:
        """The prompt with its images expanded must leave room in max_model_len (as vLLM checks)."""
        n = len(item.ids) - len(item.images) + image_tokens
        if n >= self.max_model_len:
            raise HTTPError(400, f"token_ids: {n} prompt tokens with the images expanded leave no room in "
                                 f"max_model_len {self.max_model_len}")
        item.max_tokens = min(item.max_tokens, self.max_model_len - n)

    async def _hold_image(self, data: bytes, i: int) -> str:
        job = asyncio.ensure_future(asyncio.to_thread(self._spool_image, data, i))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            # the thread still finishes: give back what it holds once it does
            job.add_done_callback(lambda j: j.cancelled() or j.exception() or self._spool.release(j.result()))
            raise

    async def generate(self, body: dict, images: list[bytes]) -> dict:
        item = self._parse(body)
        held: list[str] = []
        try:
            for i, data in enumerate(images):
                held.append(await self._hold_image(data, i))
            item.images = list(held)
            if held and self.max_model_len:
                self._fit(item, await asyncio.to_thread(self._image_tokens, held))
            item.future = asyncio.get_running_loop().create_future()
            await self._queue.put(item)
            return await item.future
        finally:
            for path in held:
                self._spool.release(path)

    async def _batch_loop(self) -> None:
        while True:
            first = await self._queue.get()
            await self._running.wait()
            batch = [first]
            while len(batch) < self.max_num_seqs and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._busy += len(batch)
            self._idle.clear()
            try:
                groups: dict[tuple, list[Pending]] = {}
                for it in batch:
                    s = it.sampling
                    key = (s.temperature, s.top_p, s.top_k, s.presence_penalty, frozenset(it.stop_ids))
                    groups.setdefault(key, []).append(it)
                for items in groups.values():
                    items = [it for it in items if not it.future.done()]  # the client went away
                    if items:
                        await self._run(items)
            finally:
                self._busy -= len(batch)
                if self._busy == 0 and self._queue.empty():
                    self._idle.set()

    async def _run(self, items: list[Pending]) -> None:
        try:
            turns, serving = await self._on_worker(self._generate, items)
        except Exception as e:  # one failed generate fails its request, not its batch nor the server
            if len(items) > 1:
                for it in items:  # alone, so that only the request that broke it fails
                    await self._run([it])
                return
            log.error("generate failed: %s: %s", type(e).__name__, str(e)[:500])
            for it in items:
                if not it.future.done():
                    it.future.set_exception(HTTPError(500, f"generation failed: {type(e).__name__}: {e}",
                                                      "InternalServerError"))
            return
        version, fingerprint, path = serving
        for it, t in zip(items, turns):
            if it.future.done():
                continue
            if t.error:
                it.future.set_exception(HTTPError(500, f"generation failed: {t.error}", "InternalServerError"))
                continue
            choice = {"index": 0, "finish_reason": t.finish, "stop_reason": t.ids[-1] if t.finish == "stop" else None,
                      "token_ids": t.ids, "weight_versions": [{"version": str(version), "start": 0, "end": len(t.ids)}],
                      "logprobs": ({"content": [{"token_id": tid, "logprob": lp, "rank": None, "top_logprobs": []}
                                                for tid, lp in zip(t.ids, t.logprobs)]} if it.want_logprobs else None)}
            it.future.set_result({"request_id": it.request_id, "choices": [choice],
                                  "usage": {"prompt_tokens": len(it.ids), "completion_tokens": len(t.ids),
                                            "total_tokens": len(it.ids) + len(t.ids)},
                                  "mars": {"weight_version": version, "fingerprint": fingerprint, "policy": path}})

    def _generate(self, items: list[Pending]):
        """One batch through the `hf` engine's own generate (log-probs taken as it samples)."""
        import time

        from mars_cli.engines import GenRequest
        from mars_cli.engines.hf import HFEngine

        if self.policy is None or self.policy.model is None or self._asleep:
            raise MarsError("the model is asleep")
        t0 = time.perf_counter()
        engine = HFEngine(None, sampling=items[0].sampling, loaded=self.policy, max_batch=len(items))
        eos = self.policy.special["im_end"]
        engine.stop = [eos, *sorted(items[0].stop_ids - {eos})]  # one stop set per batch (_batch_loop)
        # a row ends at once when its client left (its future is done) or the server closes
        results = engine.generate([GenRequest(ids=it.ids, images=it.images, max_new_tokens=it.max_tokens)
                                   for it in items], stop_rows=lambda: [self._closing or it.future.done() for it in items])
        st = self.stats  # read by /health: how busy the model was (a benchmark's idle fraction)
        st["busy_seconds"] += time.perf_counter() - t0
        st["batches"] += 1
        st["requests"] += len(items)
        st["generated_tokens"] += sum(len(r.ids or []) for r in results)
        if any(it.images for it in items):
            _trim_heap()  # the processor's copies of the images are freed: give their pages back
        return results, self.serving

    # ---------------------------------------------------------------- pause, sleep, close

    async def pause(self, mode: str) -> None:
        if mode == "keep":
            self._running.clear()
            return
        self._running.set()  # requests queued under an earlier "keep" are in flight: they finish (or abort)
        if mode == "abort":
            while not self._queue.empty():
                it = self._queue.get_nowait()
                if not it.future.done():
                    it.future.set_result({"request_id": it.request_id, "choices": [
                        {"index": 0, "finish_reason": "abort", "token_ids": [], "logprobs": None}]})
        await self._drained()

    async def _drained(self) -> None:
        while self._busy or not self._queue.empty():
            self._idle.clear()
            await self._idle.wait()

    async def resume(self) -> None:
        self._running.set()

    async def sleep(self, level: int) -> None:
        self._running.set()
        await self._drained()
        if level:
            await self._on_worker(self._sleep, level)
        self._asleep = level

    def _sleep(self, level: int) -> None:
        if level >= 2:
            self.policy.model = None  # weights dropped; wake_up reloads them from the checkpoint
        elif str(self.device).startswith("cuda"):
            self.policy.model.to("cpu")
        _free_memory(self.device)

    async def wake_up(self) -> None:
        if self._asleep:
            await self._on_worker(self._wake)
        self._asleep = None

    def _wake(self) -> None:
        if self.policy.model is None:
            self._load(self.policy.path, self.serving[0])
        else:
            self.policy.model.to(self.device)

    async def close(self) -> None:
        self._closing = True
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        if self._queue is not None:
            while not self._queue.empty():
                it = self._queue.get_nowait()
                if not it.future.done():
                    it.future.cancel()
        await asyncio.to_thread(self._worker.shutdown, wait=True, cancel_futures=True)
        if self._spool is not None:
            self._spool.close()


@functools.cache
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc keeps a decoded image's arenas otherwise)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
