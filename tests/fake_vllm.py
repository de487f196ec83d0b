"""A stand-in for `vllm serve` (0.33) that answers its routes with the shapes its source defines.

    python tests/fake_vllm.py serve MODEL --host 127.0.0.1 --port P [vllm flags…]

Shapes, from vllm/entrypoints: /health (serve/instrumentator/health.py) an empty 200;
/inference/v1/generate (scale_out/token_in_token_out: GenerateRequest → GenerateTokensResponse,
choices[0].token_ids, .logprobs.content[i] {token_id, logprob, rank, top_logprobs},
.finish_reason, .stop_reason, .weight_versions [{version, start, end}]); /pause?mode=…
{"status": "paused"}, /resume {"status": "resumed"}, /update_weight_version
{"success": true, "new_version"}, /collective_rpc {"results": [...]} (rl/online,
serve/dev/rpc); /sleep {"status": "sleeping", "level"}, /wake_up {"status": "awake",
"tags"} (serve/dev/sleep). Errors are ErrorResponse {"error": {message, type, param, code}}.
Every request is appended to $FAKE_VLLM_LOG as a JSON line (argv first), so tests can
check what mars sent. A reload of a path containing "broken" fails as a worker error does.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

EOS = 151645
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
LOG = os.environ.get("FAKE_VLLM_LOG")
lock = threading.Lock()
state = {"paused": False, "version": None, "model": argv[1], "sleeping": False}


def record(obj) -> None:
    if LOG:
        with lock, open(LOG, "a") as f:
            f.write(json.dumps(obj) + "\n")


def error(code: int, message: str, kind: str):
    return code, {"error": {"message": message, "type": kind, "param": None, "code": code}}


def generate(body):
    if state["paused"]:
        return error(503, "Generation is paused", "ServiceUnavailableError")
    ids = body.get("token_ids")
    if not isinstance(ids, list) or not ids:
        return error(400, "token_ids: List should have at least 1 item", "BadRequestError")
    sp = body.get("sampling_params") or {}
    for part in body.get("content_parts") or []:
        if part.get("type") != "image_url" or not str(part.get("url", "")).startswith("data:image/"):
            return error(400, "bad content part", "BadRequestError")
    max_tokens = int(sp.get("max_tokens", 16))
    toks = [(sum(ids) + k) % 1000 + 10 for k in range(3)] + [EOS]
    out = toks[:max_tokens]
    finish = "stop" if out[-1] == EOS else "length"
    lps = [-0.25 * (k + 1) for k in range(len(out))]
    content = [{"token_id": t, "logprob": lp, "rank": 1, "top_logprobs": [{"token_id": t, "logprob": lp, "rank": 1}]}
               for t, lp in zip(out, lps)] if sp.get("logprobs") is not None else None
    choice = {"index": 0, "finish_reason": finish, "stop_reason": EOS if finish == "stop" else None, "token_ids": out,
              "routed_experts": None, "sampling_mask": None, "logprobs": {"content": content} if content else None,
              "weight_versions": [{"version": state["version"], "start": 0, "end": len(out)}]}
    return 200, {"request_id": body.get("request_id", "generate-tokens-1"), "model": state["model"],
                 "created": int(time.time()), "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                                                        "total_tokens": len(ids) + len(out)},
                 "prompt_logprobs": None, "prompt_token_id_logprobs": None, "prompt_token_ids": None,
                 "mm_placeholders": None, "metrics": None, "kv_transfer_params": None, "ec_transfer_params": None,
                 "output_mode": "tokens", "choices": [choice]}


def collective_rpc(body):
    if body.get("method") != "mars_reload_weights":
        return 200, {"results": [None]}
    path = (body.get("kwargs") or {}).get("weights_path")
    if path and "broken" in path:
        return error(500, f"Error while deserializing header: {path}", "InternalServerError")
    if path:
        state["model"] = path
    return 200, {"results": [None]}


def openai_chat(body):
    """/v1/chat/completions (entrypoints/openai/chat_completion): one fixed reply, streamed when asked."""
    head = {"id": "chatcmpl-fake", "created": int(time.time()), "model": state["model"]}
    if body.get("model") != state["model"]:
        return error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
    if body.get("stream"):
        chunks = [{**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}]}
                  for piece in ("fake ", "reply")]
        chunks.append({**head, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        return 200, b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    return 200, {**head, "object": "chat.completion", "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "fake reply"}, "finish_reason": "stop"}]}


def route(method, path, query, body):
    if (method, path) == ("GET", "/health"):
        return 200, None
    if (method, path) == ("GET", "/v1/models"):
        return 200, {"object": "list", "data": [{"id": state["model"], "object": "model", "owned_by": "vllm"}]}
    if (method, path) == ("POST", "/v1/chat/completions"):
        return openai_chat(body)
    if (method, path) == ("POST", "/inference/v1/generate"):
        return generate(body)
    if (method, path) == ("POST", "/pause"):
        state["paused"] = True
        return 200, {"status": "paused"}
    if (method, path) == ("POST", "/resume"):
        state["paused"] = False
        return 200, {"status": "resumed"}
    if (method, path) == ("POST", "/update_weight_version"):
        state["version"] = body["new_version"]
        return 200, {"success": True, "new_version": body["new_version"]}
    if (method, path) == ("POST", "/collective_rpc"):
        return collective_rpc(body)
    if (method, path) == ("POST", "/init_weight_transfer_engine"):
        return 200, {"message": "Weight transfer initialized"}
    if (method, path) == ("POST", "/update_weights"):
        return 200, {"message": "Weights updated"}
    if (method, path) == ("POST", "/finish_weight_update"):
        if body.get("weight_version") is not None:
            state["version"] = body["weight_version"]
        return 200, {"message": "Weight update finished"}
    if (method, path) == ("POST", "/sleep"):
        state["sleeping"] = True
        return 200, {"status": "sleeping", "level": int(query.get("level", ["1"])[0])}
    if (method, path) == ("POST", "/wake_up"):
        state["sleeping"] = False
        return 200, {"status": "awake", "tags": None}
    return 404, {"detail": "Not Found"}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _handle(self, method):
        parts = urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        body = json.loads(raw) if raw else {}
        query = parse_qs(parts.query)
        record({"method": method, "path": parts.path, "query": query, "body": body})
        status, payload = route(method, parts.path, query, body)
        stream = isinstance(payload, bytes)  # server-sent events
        data = payload if stream else b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream" if stream else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


if __name__ == "__main__":
    record({"argv": argv, "VLLM_SERVER_DEV_MODE": os.environ.get("VLLM_SERVER_DEV_MODE")})
    time.sleep(0.5)  # a server that takes a moment to come up
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
