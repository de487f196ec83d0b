"""`mars serve`: keep a policy resident behind HTTP (token in, token out; reload without restart).

    mars serve --policy ckpt/ --engine hf --port 8100              # CPU or one GPU
    mars serve --policy ckpt/ --engine vllm --tp 2 --dp 4 --port 8100
    curl -s 127.0.0.1:8100/health
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

E = "MARS_"
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # 300 MB decoded; the bound on what one request's image may cost


def main(
    policy: Path = typer.Option(..., "--policy", envvar=E + "POLICY", help="The checkpoint directory to serve."),
    engine: str = typer.Option("hf", "--engine", envvar=E + "ENGINE", help="hf (transformers, CPU or GPU) | vllm (GPUs; on a CPU from scripts/vllm_cpu.sh)."),
    port: int = typer.Option(8100, "--port", min=0, max=65535, help="TCP port (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; any but loopback needs MARS_SERVE_API_KEY."),
    allow_load: Optional[Path] = typer.Option(None, "--allow-load", help="Directory /load may read checkpoints from [default: --policy's parent]."),
    tp: int = typer.Option(1, "--tp", min=1, help="vllm: tensor-parallel GPUs per engine."),
    dp: int = typer.Option(1, "--dp", min=1, help="vllm: data-parallel engines (vLLM's --data-parallel-size)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1, help="Prompt + generated tokens per request [default: the model's]."),
    limit_mm_per_prompt: int = typer.Option(32, "--limit-mm-per-prompt", min=0, help="Images per request (clients cap episodes to it)."),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", min=1, help="Sequences per batch [default: vllm's; hf 32]."),
    gpu_memory_utilization: float = typer.Option(0.85, "--gpu-memory-utilization", help="vllm: share of GPU memory to use."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="vllm: no CUDA graphs (faster start, slower decode)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 [default: bf16 on GPU, fp32 on CPU]."),
    device: str = typer.Option("cpu", "--device", envvar=E + "DEVICE", help="hf: cpu, cuda, cuda:1…"),
    min_pixels: Optional[int] = typer.Option(None, "--min-pixels", help="Image processor's lower pixel bound."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Image processor's upper pixel bound."),
    max_image_bytes: int = typer.Option(32 << 20, "--max-image-bytes", min=1, help="Largest encoded image accepted."),
    max_body: int = typer.Option(256 << 20, "--max-body", min=1024, help="Largest request body accepted (bytes)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed of the server."),
    sleep_mode: str = typer.Option("auto", "--sleep-mode", envvar=E + "SLEEP_MODE",
                                   help="/sleep and /wake_up: on | off | auto (on where the platform supports it: "
                                        "hf always, vllm on GPUs; off, /sleep answers 409)."),
    max_image_pixels: Optional[int] = typer.Option(None, "--max-image-pixels", envvar=E + "MAX_IMAGE_PIXELS", min=1, help="hf: largest decoded image accepted, in pixels (a 400 above it) [default: 100000000]."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", min=0, help="Seconds in-flight requests get to finish after SIGTERM/SIGINT (a second signal stops at once)."),
    max_connections: int = typer.Option(256, "--max-connections", min=1, help="Open connections at most; the next one gets 503."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Log warnings and errors only."),
) -> None:
    """Serve a policy over HTTP until SIGINT/SIGTERM; print its URL when ready.

    Token-in/token-out generation at POST /inference/v1/generate (vLLM's request and response), GET /health (200 when serving: policy, fingerprint, weight version; 503 while loading), POST /load {"path": DIR} (new weights without a restart; the weight version goes up by one; a failed load keeps the old weights; the answer's `probe` holds the new weights' log-probs on a fixed probe, which `update --push` checks against the trainer), /pause, /resume, /sleep, /wake_up; OpenAI's GET /v1/models, POST /v1/chat/completions and /v1/completions for any OpenAI client (images as data: URLs, streaming); POST /trainer, the lease of an `update --follow` that pushes here (/health's `trainer`). --engine vllm runs `vllm serve` on a private loopback port behind this layer. Prints one JSON line {url, policy, fingerprint, weight_version} on stdout once ready; logs go to stderr.
    """
    import os

    from mars_cli.errors import UsageError
    from mars_cli.jsonl import RecordWriter
    from mars_cli.serve.app import App
    from mars_cli.serve.run import check_exposure, run, setup_logging

    api_key = os.environ.get("MARS_SERVE_API_KEY") or None
    check_exposure(host, api_key)
    if engine not in ("hf", "vllm"):
        raise UsageError(f"--engine must be hf or vllm, got {engine!r}")
    if sleep_mode not in ("auto", "on", "off"):
        raise UsageError(f"--sleep-mode must be auto, on or off, got {sleep_mode!r}")
    from mars_cli.models.load import read_config

    read_config(policy)  # a missing or non-model directory: said now, before anything starts
    setup_logging(quiet)
    if max_image_pixels:
        os.environ[E + "MAX_IMAGE_PIXELS"] = str(max_image_pixels)  # every image reader of this process agrees
    if engine == "hf":
        from mars_cli.serve.hf_backend import HFBackend

        backend = HFBackend(device=device, dtype=dtype, max_num_seqs=max_num_seqs or 32, min_pixels=min_pixels,
                            max_pixels=max_pixels, max_model_len=max_model_len, seed=seed,
                            max_image_pixels=max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS)
        backend.sleep_mode = sleep_mode != "off"
    else:
        from mars_cli.serve.vllm_backend import VLLMBackend, sleep_mode_available

        backend = VLLMBackend(tp=tp, dp=dp, max_model_len=max_model_len, max_images=limit_mm_per_prompt,
                              max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization,
                              enforce_eager=enforce_eager, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels,
                              seed=seed, sleep_mode=sleep_mode == "on" or (sleep_mode == "auto" and sleep_mode_available()))
    app = App(backend, allow_load=str(allow_load or policy.resolve().parent), max_images=limit_mm_per_prompt,
              max_image_bytes=max_image_bytes)

    def ready(url, app):
        with RecordWriter() as w:
            w.write({"url": url, "engine": engine, "policy": app.path, "fingerprint": app.fingerprint,
                     "weight_version": app.weight_version})

    run(app, str(policy.resolve()), host=host, port=port, api_key=api_key, max_body=max_body, on_ready=ready,
        drain_timeout=drain_timeout, max_connections=max_connections)
