"""OpenAI's API on `mars serve`: GET /v1/models, POST /v1/chat/completions and /v1/completions.

Any OpenAI client (the `openai` package, `mars rollout --engine openai`, `mars judge`)
talks to a served policy through these routes. They sit behind the same API key and
bounds as every other route: images only as data: URLs (a server opens no paths and
fetches nothing), at most --max-images per request, each within the byte limit.

- hf: a chat is rendered to token ids by the protocol's own renderer (rendering.Renderer:
  the ChatML the policy is trained and sampled with; no default system prompt is added),
  one placeholder per image, and generated through /inference/v1/generate's own path
  (App.generate: its checks, batching and weight versions). The answer is decoded
  without the end-of-turn token; `stop` strings cut it after generation. With `stream:
  true` the finished answer is sent as server-sent events (a chunk with the text, a
  chunk with the finish reason, the usage when `stream_options.include_usage`, then
  `[DONE]`): streaming clients work, and see the text at once. `n` must be 1; `seed`
  is ignored (the server has one, `mars serve --seed`); `max_tokens` defaults to 2048;
  `model` is not checked (a server serves one policy; /v1/models names it), and
  `usage.prompt_tokens` counts each image as its one placeholder, before expansion.
- vllm: vLLM's own /v1 routes, passed through unchanged (streams too) after the checks.

Shapes: OpenAI's API reference (chat.completion, chat.completion.chunk, text_completion, list).
"""

from __future__ import annotations

import json
import math
import time
import uuid

from mars_cli.serve.http import HTTPError, Request, Streamed

DEFAULT_MAX_TOKENS = 2048
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class OpenAIRoutes:
    """The /v1 routes of one App (serve/app.py)."""

    def __init__(self, app):
        self.app = app
        self._renderer = None  # (tokenizer, Renderer) of the policy served now
        self.created = int(time.time())

    def routes(self) -> dict:
        return {("GET", "/v1/models"): self.models, ("POST", "/v1/chat/completions"): self.chat,
                ("POST", "/v1/completions"): self.completions}

    @property
    def _proxy(self):
        return getattr(self.app.backend, "proxy", None)  # vllm: its own OpenAI server behind this layer

    async def models(self, req: Request):
        if self._proxy is not None:
            return await self._proxy("GET", "/v1/models")
        await self.app._serving()
        return 200, {"object": "list", "data": [{"id": self.app.path, "object": "model", "created": self.created,
                                                 "owned_by": "mars", "root": self.app.path, "parent": None,
                                                 "max_model_len": self.app.backend.max_model_len}]}

    async def chat(self, req: Request):
        body = _object(req)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "messages: a non-empty list of messages is required")
        converted, urls = self._messages(messages)
        if self._proxy is not None:
            await self.app._serving()
            return await self._proxy("POST", req.path, body)
        renderer = await self._renderer_now()
        ids, _, _ = renderer.render(converted, add_generation_prompt=True)
        return await self._complete(body, ids, urls, chat=True)

    async def completions(self, req: Request):
        body = _object(req)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise HTTPError(400, "prompt: one non-empty string is required")
        if self._proxy is not None:
            await self.app._serving()
            return await self._proxy("POST", req.path, body)
        renderer = await self._renderer_now()
        return await self._complete(body, list(renderer.tok.encode(prompt, add_special_tokens=False)), [], chat=False)

    # ------------------------------------------------------------------------- requests

    def _messages(self, messages: list) -> tuple[list[dict], list[str]]:
        """OpenAI messages → protocol messages (images as placeholders) and the data: URLs, checked."""
        from mars_cli.serve.app import decode_image_part

        out, urls = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise HTTPError(400, f"messages[{i}]: an object with a role ({', '.join(ROLES)}) is required")
            content = m.get("content")
            if content is None or isinstance(content, str):
                out.append({"role": ROLES[m["role"]], "content": content or ""})
                continue
            if not isinstance(content, list):
                raise HTTPError(400, f"messages[{i}].content: a string or a list of parts is required")
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image_url":
                    url = p.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if len(urls) >= self.app.max_images:
                        raise HTTPError(400, f"more than {self.app.max_images} images in one request; this server's "
                                             f"limit is {self.app.max_images}")
                    decode_image_part({"type": "image_url", "url": url}, len(urls), self.app.max_image_bytes)
                    parts.append({"type": "image", "image": f"#{len(urls)}"})
                    urls.append(url)
                else:
                    raise HTTPError(400, f"messages[{i}].content[{j}]: only text and image_url parts are served")
            out.append({"role": ROLES[m["role"]], "content": parts})
        return out, urls

    async def _renderer_now(self):
        from mars_cli.rendering import Renderer

        await self.app._serving()
        policy = self.app.backend.policy
        if self._renderer is None or self._renderer[0] is not policy.tokenizer:
            self._renderer = (policy.tokenizer, Renderer(policy.tokenizer, policy.special))
        return self._renderer[1]

    async def _complete(self, body: dict, ids: list[int], urls: list[str], *, chat: bool):
        stops = _stops(body.get("stop"))
        gen = {"token_ids": ids, "content_parts": [{"type": "image_url", "url": u} for u in urls],
               "sampling_params": _sampling(body)}
        status, out = await self.app.generate(Request("POST", "/inference/v1/generate", {}, {},
                                                      json.dumps(gen).encode()))
        choice = out["choices"][0]
        if choice.get("finish_reason") == "abort":
            raise HTTPError(503, "the request was aborted (the server paused); retry", "ServiceUnavailableError")
        tids = list(choice.get("token_ids") or [])
        policy = self.app.backend.policy
        eos = policy.special["im_end"]
        if tids and tids[-1] == eos:
            tids = tids[:-1]
        text = policy.tokenizer.decode(tids, skip_special_tokens=True)
        finish = choice.get("finish_reason") or "stop"
        cut = min((k for k in (text.find(s) for s in stops) if k >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        usage = out.get("usage") or {"prompt_tokens": len(ids), "completion_tokens": len(tids),
                                     "total_tokens": len(ids) + len(tids)}
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": body.get("model") or self.app.path}
        if body.get("stream"):
            return 200, Streamed(_events(head, text, finish, usage, chat=chat,
                                         usage_chunk=bool((body.get("stream_options") or {}).get("include_usage"))))
        if chat:
            c = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                 "logprobs": None}
            return 200, {**head, "object": "chat.completion", "choices": [c], "usage": usage}
        c = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return 200, {**head, "object": "text_completion", "choices": [c], "usage": usage}


def _object(req: Request) -> dict:
    body = req.json(max_values=1 << 20)  # as /inference/v1/generate: bounded before parsing
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise HTTPError(400, f"{name}: a number in [{lo:g}, {hi:g}] is required")
    return float(v)


def _sampling(body: dict) -> dict:
    """The request's sampling, as /inference/v1/generate's sampling_params."""
    if body.get("n", 1) != 1:
        raise HTTPError(400, "n: only 1 is supported (send one request per sample)")
    if body.get("logprobs") or body.get("top_logprobs") or body.get("echo"):
        raise HTTPError(400, "logprobs and echo are not served on /v1 (use /inference/v1/generate)")
    if _number(body, "frequency_penalty", 0.0, -2, 2):
        raise HTTPError(400, "frequency_penalty: not supported (presence_penalty is)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if type(max_tokens) is not int or max_tokens < 1:
        raise HTTPError(400, "max_tokens: a positive integer is required")
    sp = {"temperature": _number(body, "temperature", 1.0, 0, 2), "top_p": _number(body, "top_p", 1.0, 0, 1),
          "presence_penalty": _number(body, "presence_penalty", 0.0, -2, 2), "max_tokens": max_tokens}
    if body.get("top_k") is not None:  # vLLM's extension, which `mars rollout --engine openai --top-k` sends
        sp["top_k"] = body["top_k"]
    return sp


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise HTTPError(400, "stop: a string or a list of up to 4 non-empty strings")
    return stops


async def _events(head: dict, text: str, finish: str, usage: dict, *, chat: bool, usage_chunk: bool):
    """The finished answer as server-sent events, in OpenAI's chunk shapes."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, **extra) -> bytes:
        return b"data: " + json.dumps({**head, "object": kind, "choices": choices, **extra}).encode() + b"\n\n"

    if chat:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None,
                      "logprobs": None}])
        yield event([{"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None}])
    else:
        yield event([{"index": 0, "text": text, "finish_reason": None, "logprobs": None}])
        yield event([{"index": 0, "text": "", "finish_reason": finish, "logprobs": None}])
    if usage_chunk:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"
