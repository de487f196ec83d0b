"""Policy engines behind one interface: `Engine.generate(requests) -> results`, and
`await Engine.agenerate(request) -> result` for the asynchronous agent loop.

An engine turns a batch of prompts into one assistant turn each. Token engines (`hf`,
`vllm`) take the prompt as token ids with ONE <|image_pad|> per image (the engine expands
placeholders to the processor's patch count itself) and return the exact ids they sampled
with the log-prob of each under the policy; the agent loop never re-tokenizes text. Chat
engines (`openai`) take the messages instead and return text only (not trainable).

Which distribution the stored log-probs are of: log softmax(logits / T) over the whole
vocabulary, T the sampling temperature (T = 1 when sampling greedily), taken before
top-k/top-p truncation and before the presence penalty. At T = 1 with top-p = 1 and no
top-k this is exactly log π(token | prefix), what `update` recomputes by a forward pass.

Asynchronous use: `agenerate` may be awaited by many episodes at once. In-process engines
(hf, vllm offline) inherit the default here: the requests pending at one moment are
micro-batched into ONE `generate` call on a worker thread, and the requests that arrive
while it runs form the next batch, so the GPU still sees batches while no episode waits
for another's tools. Chat engines (tokens=False) run each request on its own worker
thread. A remote engine (`server`) overrides `agenerate` with real async HTTP. A failed
request comes back as `GenResult(error=…)`; an exception out of `agenerate` means the
engine itself is gone (no server left) and ends the run.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import asdict, dataclass, field
from typing import Any

from mars_cli.errors import MarsError, UsageError

ENGINES = {"hf": "mars_cli.engines.hf:HFEngine", "vllm": "mars_cli.engines.vllm_engine:VLLMEngine",
           "openai": "mars_cli.engines.openai_engine:OpenAIEngine", "server": "mars_cli.engines.server:ServerEngine"}


@dataclass
class Sampling:
    """How tokens are drawn; the same fields for every engine (recorded in `policy`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0):
            raise UsageError(f"--temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenRequest:
    """One prompt to continue by one assistant turn."""

    ids: list[int] | None = None  # token engines: prompt ids, one image_pad per image
    images: list[str] = field(default_factory=list)  # image paths in placeholder order
    messages: list[dict] | None = None  # chat engines: the conversation so far
    max_new_tokens: int = 1024


@dataclass
class GenResult:
    """One generated turn. `ids`/`logprobs` are None for chat engines."""

    text: str
    ids: list[int] | None = None
    logprobs: list[float] | None = None
    finish: str = "stop"  # "stop": ended by itself (<|im_end|>) ; "length": hit max_new_tokens
    error: str | None = None  # an engine failure for this request; the episode ends with "error"
    usage: int | None = None  # chat engines: tokens the request consumed (prompt + completion)
    weight_version: int | None = None  # the weights that sampled it (servers count their loads)
    fingerprint: str | None = None  # the checkpoint that sampled it, when the engine knows per request


class Engine:
    """The interface the agent loop drives. Subclasses set the attributes below."""

    name: str = "engine"
    tokens: bool = True  # works on token ids; False for chat APIs (records get tokens=null)
    path: str = ""
    fingerprint: str | None = None
    sampling: Sampling
    renderer: Any = None  # protocol.Renderer for token engines
    special: dict | None = None
    max_images: int | None = None  # images one episode may hold (a server's limit_mm_per_prompt); None = no cap
    weight_version: int | None = None  # None: weights never change under this engine
    pixels: dict | None = None  # {"min", "max"}: the image processor's limits, recorded per trajectory
    image_factor: int | None = None  # patch size × merge size: images resize to multiples of it

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        raise NotImplementedError

    def image_tokens(self, image: str) -> int:
        """How many tokens an image expands to in the model's input (for the budget)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of generated ids, every token as written (no special-token skipping or space clean-up)."""
        return decode_ids(self.renderer.tok, ids)

    def describe(self) -> dict:
        """The `policy` field of a trajectory record."""
        out = {"path": self.path, "fingerprint": self.fingerprint, "engine": self.name,
               "sampling": self.sampling.to_dict(), "trainable": self.tokens}
        if self.weight_version is not None:
            out["weight_version"] = self.weight_version
        if self.pixels is not None:
            out["pixels"] = dict(self.pixels)
        return out

    def close(self) -> None:
        pass

    # --- asynchronous use ---------------------------------------------------------------

    async def agenerate(self, req: GenRequest) -> GenResult:
        """One turn for one request; many may be awaited at once (see the module docstring)."""
        loop = asyncio.get_running_loop()
        if not self.tokens:
            [res] = await loop.run_in_executor(None, self.generate_isolated, [req])
            return res
        state = self.__dict__.get("_microbatch")
        if state is None or state.loop is not loop:
            state = self.__dict__["_microbatch"] = _MicroBatch(loop)
        fut = loop.create_future()
        state.pending.append((req, fut))
        if not state.busy:
            state.busy = True
            # call_soon: every episode made ready by the same event enqueues first
            loop.call_soon(self._launch_batch, state)
        return await fut

    async def aclose(self) -> None:
        """Release what belongs to the event loop now ending (a remote engine's HTTP client)."""

    def lost(self) -> str | None:
        """Why this engine can serve no request any more (a remote engine with no server left)."""
        return None

    async def apoll_weight_version(self) -> int | None:
        """The weight version now (a server engine asks its servers; others know it)."""
        return self.weight_version

    def generate_isolated(self, requests: list[GenRequest]) -> list[GenResult]:
        """generate(), with a failure confined to the requests that cause it (one retry each)."""
        try:
            results = self.generate(requests)
            if len(results) != len(requests):
                raise MarsError(f"engine {self.name} returned {len(results)} results for {len(requests)} requests")
            return results
        except Exception as e:  # noqa: BLE001 — isolate the failing request, keep the others
            if len(requests) == 1:
                return [failed_result(e)]
            out = []
            for r in requests:
                try:
                    out.extend(self.generate([r]))
                except Exception as e1:  # noqa: BLE001
                    out.append(failed_result(e1))
            return out

    def _launch_batch(self, state: "_MicroBatch") -> None:
        batch = [(r, f) for r, f in state.pending if not f.done()]
        state.pending = []
        if not batch:
            state.busy = False
            return
        work = state.loop.run_in_executor(None, self.generate_isolated, [r for r, _ in batch])
        work.add_done_callback(lambda w: self._batch_done(state, batch, w))

    def _batch_done(self, state: "_MicroBatch", batch: list, work: "asyncio.Future") -> None:
        for i, (_, fut) in enumerate(batch):
            if fut.done():
                continue
            if work.cancelled():
                fut.cancel()
            elif work.exception() is not None:
                fut.set_exception(work.exception())
            else:
                fut.set_result(work.result()[i])
        if state.pending:
            state.loop.call_soon(self._launch_batch, state)
        else:
            state.busy = False


class _MicroBatch:
    """Requests waiting for the in-process engine, and whether a generate call is running."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list = []
        self.busy = False


def failed_result(e: BaseException) -> GenResult:
    """The result of a request the engine failed on (the episode ends `error` with the reason)."""
    from mars_cli import streams

    msg = str(e) if isinstance(e, MarsError) else f"{type(e).__name__}: {e}"
    streams.warn(f"engine failed for an episode: {msg}")
    return GenResult(text="", error=msg)


# Tokens a policy must never sample: a generated image placeholder or vision marker would
# claim an image that is not there, and the sequence could not be fed back to the model.
NEVER_SAMPLED = ("image_pad", "vision_start", "vision_end")


def never_sampled(special: dict | None) -> list[int]:
    """The ids generation suppresses (its logits are still recorded as the model gave them)."""
    return sorted({special[k] for k in NEVER_SAMPLED if special and k in special})


def decode_ids(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def stop_ids(special: dict, ends=()) -> list[int]:
    """The ids that end a turn: <|im_end|>, then `ends`, the checkpoint's own end-of-sequence
    ids (models.load.end_ids: Qwen-VL's <|endoftext|> too), where vLLM and sglang, the
    engines of the official evaluation and training, end a reply whatever the request asks."""
    out = [special["im_end"]]
    for t in ends:
        if t not in out:
            out.append(int(t))
    return out


def cut_at_stop(ids: list[int], stops: list[int]) -> tuple[list[int], list[int]]:
    """(the ids up to and including the first stop id, the same without it when it is there)."""
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k + 1], ids[:k]
    return ids, ids


def strip_eos(ids: list[int], eos: int) -> tuple[list[int], bool]:
    """The ids of a turn without its final end-of-turn token, and whether it was there."""
    if ids and ids[-1] == eos:
        return ids[:-1], True
    return ids, False


def open_engine(name: str, *, policy: str | None = None, sampling: Sampling | None = None, **opts) -> Engine:
    """An engine by name: "hf", "vllm", "openai" or "server"; `opts` go to its constructor."""
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")
    modname, clsname = ENGINES[name].split(":")
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        raise MarsError(f"engine {name}: cannot import {e.name or e}: {e}") from None
    return getattr(mod, clsname)(policy, sampling=sampling or Sampling(), **opts)
