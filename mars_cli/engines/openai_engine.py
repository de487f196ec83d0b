"""The `openai` engine: any OpenAI-compatible chat endpoint (GPT-4o, a vLLM server, …).

For baselines and teacher trajectories. The conversation is sent as chat messages with
images as data URLs (http(s) URLs pass through); tool results are sent as user turns
wrapped in <tool_response>, as the Qwen template renders them, because the protocol's
calls are plain text rather than the API's function-calling objects; adjacent text parts
are sent as one. The endpoint returns text only, so records carry tokens=null and are not
trainable.

Images are sent as their files are (`image_view=None`), or, with `image_view=(min_pixels,
max_pixels, factor)` (the `sensenova-eval` profile's `send_images="view"`), as the
official evaluation sends them: decoded by the process's mode, resized by smart_resize
within those bounds (bicubic) and encoded as PNG (inference/eval.py:1424-1427, 315-323).

The key comes from MARS_OPENAI_API_KEY or OPENAI_API_KEY only; it never reaches a record.
Requests of a batch run concurrently (`concurrency` threads).
"""

from __future__ import annotations

import base64
import functools
import os
from concurrent.futures import ThreadPoolExecutor

from mars_cli.engines import Engine, GenRequest, GenResult, Sampling
from mars_cli.errors import MarsError, UsageError
from mars_cli.strictjson import clean_text

def data_url(path: str, view: tuple | None = None, decode: str | None = None) -> str:
    """An image file as a data URL; remote URLs are passed through unchanged.

    Only a real image is sent (images.read_image_file: a regular file within the size
    bound whose header an image decoder recognises, under the pixel limit): a task naming
    /etc/passwd or a device gets an error, and nothing leaves the machine. With `view`
    (min_pixels, max_pixels, factor) the image is resized to the model's view and sent as
    PNG instead of as stored.
    """
    if path.startswith(("http://", "https://", "data:")):
        return path
    if view is not None:
        return _view_url(path, view, decode)
    return _file_url(path)


@functools.lru_cache(maxsize=256)
def _file_url(path: str) -> str:
    from mars_cli.images import read_image_file

    data, mime = read_image_file(path)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@functools.lru_cache(maxsize=16)  # a resized 8 MP view is ~10-25 MB of PNG: keep few
def _view_url(path: str, view: tuple, decode: str | None) -> str:
    return "data:image/png;base64," + base64.b64encode(view_png(path, *view, decode=decode)).decode("ascii")


def view_png(path: str, min_pixels: int, max_pixels: int, factor: int, *, decode: str | None = None) -> bytes:
    """The image resized by the official smart_resize (bicubic), as PNG bytes."""
    import io

    from PIL import Image

    from mars_cli import images, sensenova

    im = Image.fromarray(images.load_array(path, decode=decode))
    h, w = sensenova.smart_resize(im.height, im.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    if (w, h) != im.size:
        im = im.resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _parts(content, view: tuple | None = None) -> list[dict] | str:
    if isinstance(content, str):
        return content
    out: list[dict] = []
    for p in content or []:
        if p.get("type") == "image":
            from mars_cli.images import decode_mode

            url = data_url(str(p["image"]), view, decode_mode() if view else None)
            out.append({"type": "image_url", "image_url": {"url": url}})
        else:
            out.append({"type": "text", "text": p.get("text", "")})
    return _merge_text(out)


def to_chat(messages: list[dict], view: tuple | None = None) -> list[dict]:
    """Our messages → OpenAI chat messages (tool results as <tool_response> user turns)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            parts = _parts(m.get("content"), view)
            parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
            body = _merge_text([{"type": "text", "text": "<tool_response>\n"}, *parts, {"type": "text", "text": "\n</tool_response>"}])
            # a text-only result as a plain string, as eval.py sends it (eval.py:1507, 1531, 1582)
            out.append({"role": "user", "content": body[0]["text"] if len(body) == 1 else body})
        elif m["role"] == "assistant":
            c = m.get("content")
            out.append({"role": "assistant", "content": c if isinstance(c, str) else "".join(p.get("text", "") for p in c or [])})
        else:
            out.append({"role": m["role"], "content": _parts(m.get("content"), view)})
    return out


def _merge_text(parts: list[dict]) -> list[dict]:
    """Adjacent text parts as one: the chat template joins them anyway (eval.py sends one)."""
    out: list[dict] = []
    for p in parts:
        if p["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = {"type": "text", "text": out[-1]["text"] + p["text"]}
        else:
            out.append(p)
    return out


class OpenAIEngine(Engine):
    name = "openai"
    tokens = False

    def __init__(self, policy, *, sampling: Sampling, base_url: str | None = None, model: str | None = None,
                 concurrency: int = 8, timeout: float | None = None, max_retries: int | None = None, client=None,
                 image_view: tuple | None = None):
        import openai

        from mars_cli.urls import public_url, split_credentials, split_query

        base_url = base_url or os.environ.get("MARS_OPENAI_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        from mars_cli.settings import env_number

        timeout = env_number("MARS_OPENAI_TIMEOUT", 120.0, integer=False, minimum=0) if timeout is None else timeout
        max_retries = env_number("MARS_OPENAI_RETRIES", 3, minimum=0) if max_retries is None else max_retries
        if not (timeout > 0 and timeout != float("inf")):
            raise UsageError(f"the openai request timeout must be a positive number of seconds, got {timeout}")
        if max_retries < 0:
            raise UsageError(f"the openai retries must be 0 or more, got {max_retries}")
        headers = {}
        if base_url:
            # user:password@ in the URL is Basic auth for the server (a proxy): sent as a
            # header, never kept in the URL that records and logs show.
            base_url, basic = split_credentials(base_url)
            if basic:
                headers["Authorization"] = basic
        # A query (?api_key=…) goes on every request after the route; the client would
        # append the route after it as text (…/v1?api_key=Xchat/completions).
        query_base, query = split_query(base_url) if base_url else (base_url, {})
        model = model or policy or os.environ.get("MARS_OPENAI_MODEL")
        if not model:
            raise MarsError("the openai engine needs --model (or --policy, or MARS_OPENAI_MODEL): the model name to ask for")
        key = os.environ.get("MARS_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not key:
            if not base_url:
                raise MarsError("the openai engine needs MARS_OPENAI_API_KEY (or OPENAI_API_KEY), or --base-url for a local server")
            key = "EMPTY"  # local OpenAI-compatible servers accept any key
        self.client = client or openai.OpenAI(base_url=query_base, api_key=key, timeout=timeout, max_retries=max_retries,
                                              default_headers=headers or None, default_query=query or None)
        self.model = model
        self.base_url = public_url(base_url)
        self.timeout, self.max_retries = timeout, max_retries
        self.path = model
        self.fingerprint = None
        self.sampling = sampling
        self.concurrency = max(1, concurrency)
        self.image_view = tuple(image_view) if image_view is not None else None
        if self.image_view is not None:  # the model's view (crops are cut to the same bounds)
            self.pixels = {"min": self.image_view[0], "max": self.image_view[1]}
            self.image_factor = self.image_view[2]

    def describe(self) -> dict:
        d = super().describe()
        d["base_url"] = self.base_url  # where it ran; never the key
        return d

    def image_tokens(self, image: str) -> int:
        return 0  # the budget comes from the endpoint's usage counts instead

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if len(requests) == 1:
            return [self._one(requests[0])]
        with ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def _one(self, req: GenRequest) -> GenResult:
        import openai

        s = self.sampling
        try:
            messages = to_chat(req.messages or [], self.image_view)
        except MarsError as e:  # an image that cannot be sent: this episode fails, not the run
            return GenResult(text="", error=f"openai: {e}")
        kwargs = dict(model=self.model, messages=messages, max_tokens=req.max_new_tokens,
                      temperature=s.temperature, top_p=s.top_p)
        if s.presence_penalty:
            kwargs["presence_penalty"] = s.presence_penalty
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if s.top_k:
            kwargs["extra_body"] = {"top_k": s.top_k}  # vLLM and SGLang servers accept it
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except (openai.OpenAIError, MarsError) as e:
            return GenResult(text="", error=f"openai: {type(e).__name__}: {e}")
        if not resp.choices:
            return GenResult(text="", error="openai: the response has no choices")
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        total = getattr(usage, "total_tokens", None) if usage is not None else None
        text = choice.message.content or ""
        if not isinstance(text, str):
            return GenResult(text="", error="openai: the response's message content is not text")
        # An unpaired surrogate (\\ud800 in the JSON) can be neither tokenized nor written
        # to a UTF-8 record: replaced by U+FFFD like any undecodable byte.
        return GenResult(text=clean_text(text), finish="length" if choice.finish_reason == "length" else "stop",
                         usage=int(total) if total is not None else None)
