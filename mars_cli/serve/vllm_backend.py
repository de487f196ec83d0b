"""`mars serve --engine vllm`: a child `vllm serve` on 127.0.0.1, fronted by the mars layer.

What vLLM 0.33 does itself, and is used as is (see mars_cli.serve for why a front layer):
- `--enable-scale-out` registers POST /inference/v1/generate (token_ids, content_parts,
  sampling_params → choices[0].token_ids, .logprobs.content[i].logprob, .finish_reason,
  .weight_versions); requests are forwarded unchanged.
- `VLLM_SERVER_DEV_MODE=1` registers /pause?mode=wait, /resume, /sleep?level=N, /wake_up
  (with `--enable-sleep-mode`, passed where the platform has it: vLLM's CPU build refuses
  to start with it), /collective_rpc and /update_weight_version. A load is
  /pause?mode=wait (in-flight requests finish, new ones get 503), /collective_rpc
  {"method": "mars_reload_weights", "kwargs": {"weights_path": DIR}} (every worker reloads
  in place from disk: no recompilation, CUDA graphs kept; vLLM's own `reload_weights`, then
  what vLLM derived from tied embeddings is derived again: mars_cli.engines.vllm_worker, a
  `--worker-extension-cls`), /update_weight_version, /resume.
- `--data-parallel-size N` (internal load balancing; utility calls such as
  collective_rpc reach every engine) for DP inside one server.
- `--logprobs-mode processed_logprobs`, `--generation-config vllm` (no checkpoint
  sampling defaults), `--limit-mm-per-prompt {"image": N, "video": 0}` (mars sends no video:
  vLLM then neither profiles nor warms up video inputs at start), `--mm-processor-kwargs`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys

from mars_cli.errors import MarsError
from mars_cli.serve.app import Backend
from mars_cli.serve.http import HTTPError

log = logging.getLogger("mars.serve")


def sleep_mode_available() -> bool:
    """Whether vLLM's sleep mode works here: vLLM's own answer, else whether CUDA is there."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        import torch

        return torch.cuda.is_available()
    return bool(current_platform.is_sleep_mode_available())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    import importlib.util

    exe = shutil.which("vllm")
    if exe:
        return [exe]
    if importlib.util.find_spec("vllm") is None:
        raise MarsError("--engine vllm needs vLLM 0.33 (pip install 'mars-cli[gpu]' on a GPU machine; on a CPU, "
                        "scripts/vllm_cpu.sh builds .venv-vllm with vLLM's CPU build); or use --engine hf")
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class VLLMBackend(Backend):
    engine = "vllm"

    def __init__(self, *, tp: int = 1, dp: int = 1, max_model_len: int | None = None, max_images: int = 32,
                 max_num_seqs: int | None = None, gpu_memory_utilization: float = 0.85, enforce_eager: bool = False,
                 dtype: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 seed: int | None = None, sleep_mode: bool = True, startup_timeout: float = 1800.0,
                 load_timeout: float = 1800.0, executable: list[str] | None = None):
        self.opts = dict(tp=tp, dp=dp, max_model_len=max_model_len, max_images=max_images, max_num_seqs=max_num_seqs,
                         gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, dtype=dtype,
                         min_pixels=min_pixels, max_pixels=max_pixels, seed=seed)
        self.max_model_len = max_model_len
        self.sleep_mode = sleep_mode
        self.startup_timeout = startup_timeout
        self.load_timeout = load_timeout
        self.executable = executable or vllm_command()
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.failure: str | None = None
        self._client = None
        self._watch: asyncio.Task | None = None
        self.path = ""
        self.config: dict = {}  # the served checkpoint's config.json: its folder may be gone (--keep-last)

    def argv(self, policy: str, port: int) -> list[str]:
        o = self.opts
        from mars_cli.engines.vllm_worker import EXTENSION

        args = [*self.executable, "serve", policy, "--host", "127.0.0.1", "--port", str(port),
                "--enable-scale-out", "--worker-extension-cls", EXTENSION, "--logprobs-mode", "processed_logprobs",
                "--generation-config", "vllm", "--tensor-parallel-size", str(o["tp"]),
                "--limit-mm-per-prompt", json.dumps({"image": o["max_images"], "video": 0}),
                "--gpu-memory-utilization", str(o["gpu_memory_utilization"]), "--seed", str(o["seed"] or 0),
                # /v1/chat/completions renders a message's parts through the model's own chat
                # template, as the protocol does; vLLM's detection reads a template that loops
                # over its own list (the tiny model's) as "string" and joins image and text
                # with a newline the policy never saw in training (renderers/hf.py,
                # _detect_content_format)
                "--chat-template-content-format", "openai"]
        if o["dp"] > 1:
            args += ["--data-parallel-size", str(o["dp"])]
        for flag, key in (("--max-model-len", "max_model_len"), ("--max-num-seqs", "max_num_seqs"), ("--dtype", "dtype")):
            if o[key] is not None:
                args += [flag, str(o[key])]
        if o["enforce_eager"]:
            args.append("--enforce-eager")
        if self.sleep_mode:
            args.append("--enable-sleep-mode")
        mm = {k: o[k] for k in ("min_pixels", "max_pixels") if o[k] is not None}
        if mm:
            args += ["--mm-processor-kwargs", json.dumps(mm)]
        return args

    async def _call(self, method: str, path: str, *, timeout: float = 60.0, **kw):
        import httpx

        try:
            r = await self._client.request(method, self.url + path, timeout=timeout, **kw)
        except httpx.HTTPError as e:
            raise MarsError(f"vllm serve ({self.url}) {path}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise HTTPError(r.status_code, f"vllm: {_message(r)}", "EngineError")
        return r.json() if r.content else {}

    async def start(self, policy: str) -> dict:
        import httpx

        from mars_cli.models.load import fingerprint, load_image_processor, load_tokenizer, read_config, special_ids

        cfg = read_config(policy)
        text = cfg.get("text_config") or cfg
        self.vocab_size = int(text.get("vocab_size") or cfg.get("vocab_size"))
        self.image_pad = special_ids(load_tokenizer(policy), policy)["image_pad"]
        size = load_image_processor(policy, min_pixels=self.opts["min_pixels"], max_pixels=self.opts["max_pixels"]).size
        self.pixels = {"min": int(size["shortest_edge"]), "max": int(size["longest_edge"])}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._client = httpx.AsyncClient()
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        env.pop("VLLM_API_KEY", None)  # the child is reachable only through this layer
        argv = self.argv(policy, port)
        log.info("starting %s", " ".join(argv))
        try:
            self.proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                             stdout=sys.stderr.fileno(), start_new_session=True)
        except OSError as e:
            raise MarsError(f"cannot start vllm serve ({argv[0]}): {e}") from None
        self._watch = asyncio.create_task(self._watch_child(), name="mars-serve-vllm-watch")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        while True:
            if self.failure:
                raise MarsError(self.failure)
            try:
                r = await self._client.get(self.url + "/health", timeout=5.0)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if loop.time() > deadline:
                raise MarsError(f"vllm serve did not become healthy within {self.startup_timeout:.0f} s")
            await asyncio.sleep(1.0)
        await self._call("POST", "/update_weight_version", json={"new_version": "1"})
        self.path, self.config = policy, cfg
        return {"path": policy, "fingerprint": fingerprint(policy)}

    async def _watch_child(self) -> None:
        code = await self.proc.wait()
        self.failure = f"vllm serve exited with status {code}"
        log.error("%s", self.failure)

    async def generate(self, body: dict, images: list[bytes]) -> dict:
        if self.failure:
            raise HTTPError(503, self.failure, "EngineDeadError")
        return await self._call("POST", "/inference/v1/generate", json=body, timeout=None)

    async def load(self, path: str, version: int) -> dict:
        from mars_cli.models.load import fingerprint, read_config

        new, old = read_config(path), self.config
        for key in ("model_type", "architectures"):
            if new.get(key) != old.get(key):
                raise MarsError(f"{key} {new.get(key)!r} is not the served policy's {old.get(key)!r}")
        fp = fingerprint(path)
        await self._call("POST", "/pause", params={"mode": "wait"}, timeout=self.load_timeout)
        try:
            try:
                await self._reload(path)
            except (MarsError, HTTPError) as e:
                reason = e.message if isinstance(e, HTTPError) else str(e)
                try:  # a failed reload may have replaced some tensors: put the old ones back
                    await self._reload(self.path)
                except (MarsError, HTTPError) as e2:
                    self.failure = f"reload of {path} failed and restoring {self.path} failed too: {e2}"
                    raise MarsError(self.failure) from None
                raise MarsError(f"vllm could not load it: {reason}") from None
            await self._call("POST", "/update_weight_version", json={"new_version": str(version)})
            self.path, self.config = path, new
        finally:
            if not self.failure:
                await self._call("POST", "/resume")
        return {"path": path, "fingerprint": fp}

    async def _reload(self, path: str) -> None:
        await self._call("POST", "/collective_rpc", timeout=self.load_timeout,
                         json={"method": "mars_reload_weights", "kwargs": {"weights_path": path},
                               "timeout": self.load_timeout})

    async def forward(self, path: str, body: dict) -> dict:
        """A weight-transfer call, passed to vLLM as is."""
        return await self._call("POST", path, json=body, timeout=self.load_timeout)

    async def proxy(self, method: str, path: str, body: dict | None = None):
        """vLLM's own route (its OpenAI API), passed through: (status, body), a stream as Streamed."""
        import httpx

        from mars_cli.serve.http import Streamed

        if self.failure:
            raise HTTPError(503, self.failure, "EngineDeadError")
        kw = {"json": body} if body is not None else {}
        try:
            r = await self._client.send(self._client.build_request(method, self.url + path, timeout=None, **kw),
                                        stream=True)
        except httpx.HTTPError as e:
            raise HTTPError(502, f"vllm serve {path}: {type(e).__name__}: {e}", "EngineError") from None
        if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
            async def chunks():
                try:
                    async for chunk in r.aiter_raw():
                        yield chunk
                finally:
                    await r.aclose()

            return 200, Streamed(chunks())
        await r.aread()
        await r.aclose()
        try:
            return r.status_code, r.json()
        except ValueError:
            raise HTTPError(502, f"vllm serve {path}: {_message(r)}", "EngineError") from None

    async def pause(self, mode: str) -> None:
        await self._call("POST", "/pause", params={"mode": mode}, timeout=self.load_timeout)

    async def resume(self) -> None:
        await self._call("POST", "/resume")

    async def sleep(self, level: int) -> None:
        await self._call("POST", "/sleep", params={"level": level, "mode": "wait"}, timeout=self.load_timeout)

    async def wake_up(self) -> None:
        await self._call("POST", "/wake_up", timeout=self.load_timeout)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # vLLM's workers are in its process group
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except asyncio.TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()


def _message(r) -> str:
    try:
        body = r.json()
    except ValueError:
        return f"HTTP {r.status_code}: {r.text[:300]}"
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err or body.get("detail") or body)[:500]
