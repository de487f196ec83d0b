"""Fakes for the agent-loop tests: a byte tokenizer, a scripted engine, fake search tools.

The scripted engine is a real Engine (token ids, log-probs, stop/length finishes) whose
"model" is a function from the conversation to the next assistant text, so every tool
path, limit and finish reason can be driven deliberately.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mars_cli import protocol
from mars_cli.engines import Engine, GenRequest, GenResult, Sampling, strip_eos
from mars_cli.errors import ToolError

SPECIAL = {"im_start": 1, "im_end": 2, "vision_start": 3, "vision_end": 4, "image_pad": 5, "eos": 2, "pad": 0}
_NAMES = {v: f"<|{k}|>" for k, v in SPECIAL.items() if k not in ("eos",)}
OFFSET = 16  # byte b is token OFFSET + b


class ByteTokenizer:
    """UTF-8 bytes as tokens; the special ids decode to their <|name|> strings."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i >= OFFSET:
                buf.append(i - OFFSET)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(_NAMES.get(i, f"<{i}>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class ScriptedEngine(Engine):
    """Answers each request with `script(messages)`, as ids of a byte tokenizer."""

    name = "scripted"

    def __init__(self, script, *, image_cost: int = 10, fail_when=None, delay: float = 0.0):
        self.script = script
        self.sampling = Sampling()
        self.special = dict(SPECIAL)
        self.renderer = protocol.Renderer(ByteTokenizer(), self.special)
        self.path = "scripted"
        self.fingerprint = "scripted-0"
        self.image_cost = image_cost
        self.fail_when = fail_when
        self.delay = delay
        self.calls = 0
        self.batch_sizes: list[int] = []

    def image_tokens(self, image: str) -> int:
        return self.image_cost

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        self.calls += 1
        self.batch_sizes.append(len(requests))
        if self.delay:
            time.sleep(self.delay)
        out = []
        for r in requests:
            if self.fail_when is not None and self.fail_when(r.messages):
                raise RuntimeError("scripted engine failure")
            text = self.script(r.messages)
            eos = self.special["im_end"]
            ids = list(self.renderer.tok.encode(text, add_special_tokens=False)) + [eos]
            finish = "stop"
            if len(ids) > r.max_new_tokens:
                ids, finish = ids[: r.max_new_tokens], "length"
            body, _ = strip_eos(ids, eos)
            out.append(GenResult(text=self.decode(body), ids=ids, logprobs=[-0.5] * len(ids), finish=finish))
        return out


def turn_script(turns):
    """A script that plays `turns` in order, by how many assistant turns the chat has."""
    def script(messages):
        k = sum(1 for m in messages if m["role"] == "assistant")
        return turns[min(k, len(turns) - 1)]
    return script


def call(name, **args) -> str:
    return protocol.format_assistant(f"I use {name}.", call=(name, args))


def answer(text) -> str:
    return protocol.format_assistant("I know it.", answer=text)


class FakeTextSearch:
    """The TextSearch interface over a few fixed passages (word overlap ranking)."""

    def __init__(self, passages: dict[str, str], latency: float = 0.0):
        self.passages = passages
        self.latency = latency
        self.queries: list[str] = []
        self._lock = threading.Lock()

    def search(self, query: str, k: int = 5) -> list[dict]:
        with self._lock:
            self.queries.append(query)
        if self.latency:
            time.sleep(self.latency)
        words = set(query.lower().split())
        scored = sorted(((len(words & set(t.lower().split())), title, t) for title, t in self.passages.items()), reverse=True)
        hits = [(s, ti, t) for s, ti, t in scored if s > 0][:k]
        if not hits:
            raise ToolError(f"no results for {query!r}")
        return [{"rank": i + 1, "title": ti, "text": t, "doc_id": str(i), "score": float(s), "backend": "fake"}
                for i, (s, ti, t) in enumerate(hits)]


class FakeImageSearch:
    """The ImageSearch interface returning fixed thumbnails."""

    def __init__(self, thumbs: list[tuple[str, str]]):
        self.thumbs = thumbs
        self.seen: list[str] = []

    def search(self, image: str, k: int = 5, *, task=None) -> list[dict]:
        self.seen.append(image)
        return [{"rank": i + 1, "title": t, "thumbnail": p, "score": 1.0 / (i + 1), "backend": "fake"}
                for i, (t, p) in enumerate(self.thumbs[:k])]


def make_image(path: Path, size=(400, 300), color=(200, 30, 30)) -> str:
    """A small JPEG with a gradient (so crops of different regions differ)."""
    import numpy as np
    from PIL import Image

    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    arr = np.stack([x, y, np.full((h, w), color[2], np.uint8)], axis=-1)
    Image.fromarray(arr).save(path, quality=95)
    return str(path)


class OpenAIStub:
    """A chat-completions endpoint whose reply depends on how many turns the chat has."""

    def __init__(self, turns):
        self.turns = turns
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                if not self.path.endswith("/chat/completions"):
                    self.send_response(404)
                    self.end_headers()
                    return
                k = sum(m["role"] == "assistant" for m in body["messages"])
                text = stub.turns[min(k, len(stub.turns) - 1)]
                if text is None:
                    self.send_response(400)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "bad request", "type": "invalid_request_error"}}')
                    return
                resp = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 100 * (k + 1), "completion_tokens": 20, "total_tokens": 100 * (k + 1) + 20}}
                data = json.dumps(resp).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def always_emits(src: Path, dst: Path, token: int) -> Path:
    """A copy of checkpoint `src` whose every next token is `token`, in weights alone, so any
    engine (transformers, vLLM) samples it: the last layer's attention adds a constant (its
    value projection is a bias, whatever it attends to) far larger than the residual stream on
    one hidden unit; the final norm keeps only that unit; `token`'s row (tied: embedding and
    output) is large on it. Logit about 80 for `token` against under 1 for the rest."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(dst / "model.safetensors")
    last = max(int(k.split("layers.")[1].split(".")[0]) for k in w if "layers." in k and "visual" not in k)
    prefix = next(k for k in w if k.endswith(f"layers.{last}.self_attn.v_proj.weight")).rsplit("v_proj", 1)[0]
    w[prefix + "v_proj.weight"].zero_()
    w[prefix + "v_proj.bias"].fill_(1.0)
    o = w[prefix + "o_proj.weight"]
    o.zero_()
    o[0, :] = 1000.0 / o.shape[1]  # attention output is all ones: unit 0 of the stream gains 1000
    norm = next(k for k in w if k.endswith("norm.weight") and "layers." not in k and "visual" not in k)
    w[norm].zero_()
    w[norm][0] = 1.0
    embed = next(k for k in w if k.endswith("embed_tokens.weight"))
    w[embed][token, 0] = 10.0
    if "lm_head.weight" in w:
        w["lm_head.weight"][token, 0] = 10.0
    save_file({k: v.contiguous() for k, v in w.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst  # rewritten weights: mars_model.json's recorded fingerprint no longer applies
