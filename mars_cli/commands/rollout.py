"""Run multi-turn agent episodes: task records in, trajectory records out.

    mars rollout --policy ckpt/ -n 8 < tasks.jsonl > trajectories.jsonl
    mars rollout --engine openai --model gpt-4o -o runs/gpt4o.jsonl tasks.jsonl
    mars rollout --check --policy ckpt/ trajectories.jsonl      # verify stored tokens
"""

from __future__ import annotations

from typing import List, Optional

import typer

from mars_cli.errors import UsageError

E = "MARS_"


def main(
    files: List[str] = typer.Argument(None, help="Task JSONL files (default: stdin)."),
    policy: Optional[str] = typer.Option(None, "--policy", envvar=E + "POLICY", help="Model directory (hf, vllm) or model name (openai)."),
    n: int = typer.Option(1, "-n", help="Samples per task (a group)."),
    engine: str = typer.Option("hf", "--engine", envvar=E + "ENGINE", help="hf | vllm | openai."),
    out: Optional[str] = typer.Option(None, "-o", "--out", help="Write records to FILE (atomically) instead of stdout."),
    resume: bool = typer.Option(False, "--resume", help="Skip (task, sample) pairs already finished in -o FILE."),
    check: bool = typer.Option(False, "--check", help="Read trajectories and verify their tokens instead."),
    max_turns: int = typer.Option(10, "--max-turns", help="Turns per episode."),
    max_total_tokens: int = typer.Option(16384, "--max-total-tokens", help="Token budget per episode (images counted expanded)."),
    max_new_tokens: int = typer.Option(2048, "--max-new-tokens", help="Tokens per turn."),
    batch_size: int = typer.Option(64, "--batch-size", help="Episodes stepped together."),
    temperature: float = typer.Option(1.0, "--temperature"), top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."), presence_penalty: float = typer.Option(0.0, "--presence-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: str = typer.Option("cpu", "--device", envvar=E + "DEVICE", help="hf engine: cpu, cuda, cuda:1…"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16."),
    attn_implementation: Optional[str] = typer.Option(None, "--attn-implementation", envvar="MARS_ATTN_IMPLEMENTATION", help="hf engine: sdpa | flash_attention_2 | eager."),
    tp: int = typer.Option(1, "--tp", help="vllm: tensor-parallel GPUs."),
    gpu_memory_utilization: float = typer.Option(0.85, "--gpu-memory-utilization"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="openai: endpoint URL."),
    model: Optional[str] = typer.Option(None, "--model", help="openai: model name."),
    artifacts: Optional[str] = typer.Option(None, "--artifacts", help="Crops folder (default: artifacts/ beside -o, MARS_ARTIFACTS)."),
    search_backend: Optional[str] = typer.Option(None, "--search-backend", help="local | serper | searxng | retriever."),
    index: Optional[str] = typer.Option(None, "--index", help="Local text index directory."),
    image_search_backend: Optional[str] = typer.Option(None, "--image-search-backend", help="local | precomputed | serper."),
    image_index: Optional[str] = typer.Option(None, "--image-index", help="Local image index directory."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Tool record/replay cache directory."),
    replay: bool = typer.Option(False, "--replay", help="Tool calls from the cache only."),
    summarize: bool = typer.Option(False, "--summarize", help="Summarize text search pages with an LLM."),
    llm_base_url: Optional[str] = typer.Option(None, "--llm-base-url"), llm_model: Optional[str] = typer.Option(None, "--llm-model"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable input lines."),
) -> None:
    """Run agent episodes: tasks in, trajectories out.

    Each task is run -n times (one group). Episodes stream out as they finish; tool calls
    run concurrently; a Ctrl-C with -o keeps the episodes already finished (use --resume).
    """
    from mars_cli.agent import run as runner

    if check:
        if not policy:
            raise UsageError("--check needs --policy (for its tokenizer)")
        runner.check_files(files, policy, out=out, skip_bad=skip_bad)
        return
    if resume and not out:
        raise UsageError("--resume needs -o FILE (the output to continue)")
    if n < 1:
        raise UsageError(f"-n must be at least 1, got {n}")
    runner.rollout(
        files, out=out, resume=resume, skip_bad=skip_bad, n=n,
        engine=dict(name=engine, policy=policy, device=device, dtype=dtype, attn_implementation=attn_implementation, tp=tp, gpu_memory_utilization=gpu_memory_utilization,
                    base_url=base_url, model=model),
        sampling=dict(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty, seed=seed),
        limits=dict(max_turns=max_turns, max_total_tokens=max_total_tokens, max_new_tokens=max_new_tokens),
        batch_size=batch_size, artifacts=artifacts,
        tools=dict(search_backend=search_backend, index=index, image_search_backend=image_search_backend,
                   image_index=image_index, cache=cache, replay=replay, summarize=summarize,
                   search_opts={"llm_base_url": llm_base_url, "llm_model": llm_model}),
    )
