"""Run multi-turn agent episodes: task records in, trajectory records out.

    mars rollout --policy ckpt/ -n 8 < tasks.jsonl > trajectories.jsonl
    mars rollout --engine openai --model gpt-4o -o runs/gpt4o.jsonl tasks.jsonl
    mars rollout --check --policy ckpt/ trajectories.jsonl      # verify stored tokens
    mars rollout --server http://127.0.0.1:8000 -n 8 -o traj.jsonl tasks.jsonl   # a `mars serve` policy
"""

from __future__ import annotations

from typing import List, Optional

import typer

from mars_cli.commands import _episode as X
from mars_cli.errors import UsageError
from mars_cli.flags import renamed

E = "MARS_"


@renamed({"--batch-size": "--max-inflight"})
def main(
    ctx: typer.Context,
    files: List[str] = typer.Argument(None, help="Task JSONL files (default: stdin)."),
    policy: Optional[str] = typer.Option(None, "--policy", envvar=E + "POLICY", help="Model directory (hf, vllm) or model name (openai)."),
    n: int = typer.Option(1, "-n", help="Samples per task (a group)."),
    engine: Optional[str] = typer.Option(None, "--engine", envvar=E + "ENGINE", help="hf | vllm | openai (default hf; --server implies server)."),
    server: Optional[str] = typer.Option(None, "--server", envvar=E + "SERVER", help="URL[,URL…] of `mars serve` policy servers; needs neither --policy nor --engine."),
    out: Optional[str] = typer.Option(None, "-o", "--out", help="Append each finished episode to FILE (truncated at start unless --resume)."),
    resume: bool = typer.Option(False, "--resume", help="Continue -o FILE: keep its finished episodes, rerun errors and the rest."),
    check: bool = typer.Option(False, "--check", help="Read trajectories and verify their tokens instead."),
    max_turns: int = X.MAX_TURNS,
    max_prompt_tokens: int = X.MAX_PROMPT_TOKENS,
    max_response_tokens: int = X.MAX_RESPONSE_TOKENS,
    max_total_tokens: Optional[int] = X.MAX_TOTAL_TOKENS,
    max_new_tokens: int = X.MAX_NEW_TOKENS,
    max_inflight: int = typer.Option(64, "--max-inflight", help="Episodes running at once (every engine)."),
    min_pixels: Optional[int] = X.MIN_PIXELS,
    max_pixels: Optional[int] = X.MAX_PIXELS,
    protocol: Optional[str] = X.PROTOCOL,
    system_prompt: Optional[str] = X.SYSTEM_PROMPT,
    on_malformed: Optional[str] = X.ON_MALFORMED,
    workflow: str = X.WORKFLOW,
    group_order: bool = typer.Option(False, "--group-order", help="Write each group's samples together when the group is done."),
    max_error_rate: float = typer.Option(0.5, "--max-error-rate", help="Exit 1 when more episodes than this share end in error."),
    loop: bool = typer.Option(False, "--loop", help="Re-read the input forever, reshuffled each pass (by --seed)."),
    batch_groups: Optional[int] = typer.Option(None, "--batch-groups", help="Groups per training batch (for --max-staleness)."),
    max_staleness: int = typer.Option(1, "--max-staleness", help="Batches rollout may run ahead of the servers' weights."),
    temperature: float = typer.Option(1.0, "--temperature"), top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."), presence_penalty: float = typer.Option(0.0, "--presence-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    preset: Optional[str] = typer.Option(None, "--preset", help="official-script: the released training script's rollout (T 1, presence penalty 1.5, seed 3407, 10 turns, 16,384 + 16,384 tokens in a 32,768 context); explicit flags win."),
    sampling_preset: Optional[str] = typer.Option(None, "--sampling", help="greedy (T 0) or official (T 0.7, top-p 0.8, top-k 20, presence penalty 1.5, as the official evaluation); explicit flags win."),
    device: str = typer.Option("cpu", "--device", envvar=E + "DEVICE", help="hf engine: cpu, cuda, cuda:1…"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16."),
    attn_implementation: Optional[str] = typer.Option(None, "--attn-implementation", envvar="MARS_ATTN_IMPLEMENTATION", help="hf engine: sdpa | flash_attention_2 | eager."),
    tp: int = typer.Option(1, "--tp", help="vllm: tensor-parallel GPUs."),
    gpu_memory_utilization: float = typer.Option(0.85, "--gpu-memory-utilization"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="openai: endpoint URL."),
    model: Optional[str] = typer.Option(None, "--model", help="openai: model name."),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", help="openai, server: seconds per request [default: MARS_OPENAI_TIMEOUT or 120; server 600]."),
    retries: Optional[int] = typer.Option(None, "--retries", help="openai: retries of a failed request [default: MARS_OPENAI_RETRIES or 3]."),
    artifacts: Optional[str] = typer.Option(None, "--artifacts", help="Crops folder (default: artifacts/ beside -o, MARS_ARTIFACTS)."),
    search_backend: Optional[str] = X.SEARCH_BACKEND,
    index: Optional[str] = X.INDEX,
    search_k: int = X.SEARCH_K,
    image_search_backend: Optional[str] = X.IMAGE_SEARCH_BACKEND,
    image_index: Optional[str] = X.IMAGE_INDEX,
    cache: Optional[str] = X.CACHE,
    replay: bool = typer.Option(False, "--replay", help="Tool calls from the cache only."),
    summarize: bool = typer.Option(False, "--summarize", help="Summarize text search pages with an LLM."),
    llm_base_url: Optional[str] = typer.Option(None, "--llm-base-url"), llm_model: Optional[str] = typer.Option(None, "--llm-model"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable input lines."),
) -> None:
    """Run agent episodes: tasks in, trajectories out.

    Each task is run -n times (one group). Episodes run independently (up to --max-inflight
    at once) and stream out as they finish; with -o each is appended as it ends, so an
    interrupted run loses nothing finished (continue it with --resume). A bad input line
    stops reading: the started episodes finish, then exit 1. One summary line ends every run.
    """
    from mars_cli import presets as _presets
    from mars_cli.agent import run as runner
    from mars_cli.protocol import get_profile

    run_sampling, run_limits = _presets.split_sampling(_presets.training(preset, "rollout"))

    if check:
        if not policy:
            raise UsageError("--check needs --policy (for its tokenizer)")
        runner.check_files(files, policy, out=out, skip_bad=skip_bad)
        return
    if resume and not out:
        raise UsageError("--resume needs -o FILE (the output to continue)")
    if n < 1:
        raise UsageError(f"-n must be at least 1, got {n}")
    if max_inflight < 1:
        raise UsageError(f"--max-inflight must be at least 1, got {max_inflight}")
    if not 0 <= max_error_rate <= 1:
        raise UsageError(f"--max-error-rate must be in [0, 1], got {max_error_rate}")
    from mars_cli.agent.workflow import check_episode_flags

    check_episode_flags(workflow=workflow, on_malformed=on_malformed, protocol=protocol)
    urls = [u.strip() for u in server.split(",") if u.strip()] if server else None
    if server is not None and not urls:
        raise UsageError("--server needs at least one URL")
    if urls and engine not in (None, "server"):
        raise UsageError(f"--server and --engine {engine} disagree: --server runs the policy on those servers")
    if loop and out is None:
        from mars_cli.pipes import exit_when_reader_gone

        exit_when_reader_gone()  # `update --follow --max-steps` ends the loop while it may wait for weights
    if batch_groups is not None and not urls:
        raise UsageError("--batch-groups/--max-staleness follow the weights of --server policy servers")
    runner.rollout(
        files, out=out, resume=resume, skip_bad=skip_bad, n=n,
        engine=dict(name="server" if urls else (engine or "hf"), policy=policy, device=device, dtype=dtype,
                    attn_implementation=attn_implementation, tp=tp, gpu_memory_utilization=gpu_memory_utilization,
                    base_url=base_url, model=model, timeout=request_timeout, max_retries=retries, urls=urls,
                    min_pixels=min_pixels, max_pixels=max_pixels),
        sampling=_presets.apply(ctx, dict(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                                          seed=seed), {**_presets.sampling(sampling_preset), **run_sampling}),
        limits=_presets.apply(ctx, dict(max_turns=max_turns, max_prompt_tokens=max_prompt_tokens,
                                        max_response_tokens=max_response_tokens, max_total_tokens=max_total_tokens,
                                        max_new_tokens=max_new_tokens), {**get_profile(protocol).limits, **run_limits}),
        max_inflight=max_inflight, artifacts=artifacts, group_order=group_order, max_error_rate=max_error_rate,
        loop=loop, seed=seed, batch_groups=batch_groups, max_staleness=max_staleness, protocol=protocol,
        on_malformed=on_malformed, workflow=workflow, system_prompt=system_prompt,
        tools=dict(search_backend=search_backend, index=index, k=search_k, image_search_backend=image_search_backend,
                   image_index=image_index, cache=cache, replay=replay, summarize=summarize,
                   search_opts={"llm_base_url": llm_base_url, "llm_model": llm_model}),
    )
