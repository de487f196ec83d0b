"""Ask the agent one question about one image, for a person.

    mars ask photo.jpg "What is written on the small sign?" --policy ckpt/

The trace (thinking, tool calls, crop boxes, results) goes to stderr as it happens;
stdout gets the answer as plain text, or the trajectory record with --json.
"""

from __future__ import annotations

from typing import Optional

import typer

from mars_cli.commands import _episode as X

E = "MARS_"


def main(
    ctx: typer.Context,
    image: str = typer.Argument(..., help="The image: a path, or an http(s) URL (fetched into the artifacts folder; public addresses only)."),
    question: str = typer.Argument(..., help="The question."),
    policy: Optional[str] = typer.Option(None, "--policy", envvar=E + "POLICY", help="Model directory (hf, vllm) or model name (openai)."),
    engine: str = typer.Option("hf", "--engine", envvar=E + "ENGINE", help="hf | vllm | openai."),
    server: Optional[str] = typer.Option(None, "--server", envvar=E + "SERVER", help="URL[,URL…] of `mars serve` policy servers (instead of --engine)."),
    as_json: bool = typer.Option(False, "--json", help="Print the trajectory record instead of the answer."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No trace on stderr."),
    max_turns: int = X.MAX_TURNS,
    max_prompt_tokens: int = X.MAX_PROMPT_TOKENS,
    max_response_tokens: int = X.MAX_RESPONSE_TOKENS,
    max_total_tokens: Optional[int] = X.MAX_TOTAL_TOKENS,
    max_new_tokens: int = X.MAX_NEW_TOKENS,
    min_pixels: Optional[int] = X.MIN_PIXELS,
    max_pixels: Optional[int] = X.MAX_PIXELS,
    protocol: Optional[str] = X.PROTOCOL,
    system_prompt: Optional[str] = X.SYSTEM_PROMPT,
    on_malformed: Optional[str] = X.ON_MALFORMED,
    workflow: str = X.WORKFLOW,
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (the default here)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: str = typer.Option("cpu", "--device", envvar=E + "DEVICE"),
    attn_implementation: Optional[str] = typer.Option(None, "--attn-implementation", envvar=E + "ATTN_IMPLEMENTATION", help="hf engine: sdpa | flash_attention_2 | eager."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="openai: endpoint URL."),
    model: Optional[str] = typer.Option(None, "--model", help="openai: model name."),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", help="openai: seconds per request [default: MARS_OPENAI_TIMEOUT or 120]."),
    retries: Optional[int] = typer.Option(None, "--retries", help="openai: retries of a failed request [default: MARS_OPENAI_RETRIES or 3]."),
    artifacts: Optional[str] = typer.Option(None, "--artifacts", help="Crops folder (default: MARS_ARTIFACTS or ./artifacts)."),
    search_backend: Optional[str] = X.SEARCH_BACKEND,
    index: Optional[str] = X.INDEX,
    search_k: int = X.SEARCH_K,
    image_search_backend: Optional[str] = X.IMAGE_SEARCH_BACKEND,
    image_index: Optional[str] = X.IMAGE_INDEX,
    cache: Optional[str] = X.CACHE,
) -> None:
    """Answer one question about an image, with a trace."""
    from mars_cli import presets, streams
    from mars_cli.agent import run
    from mars_cli.protocol import get_profile
    from mars_cli.errors import MarsError
    from mars_cli.agent.workflow import check_episode_flags
    from mars_cli.inputs import local_image
    from mars_cli.jsonl import RecordWriter

    check_episode_flags(workflow=workflow, on_malformed=on_malformed, protocol=protocol)
    urls = [u.strip() for u in server.split(",") if u.strip()] if server else None
    image = local_image(image, run.artifacts_dir(artifacts, None))  # a bad input fails before the model loads
    rec = run.ask(
        image, question, artifacts=artifacts, trace=not quiet,
        engine=dict(name="server" if urls else engine, policy=policy, urls=urls, device=device,
                    attn_implementation=attn_implementation, base_url=base_url, model=model, timeout=request_timeout,
                    max_retries=retries, min_pixels=min_pixels, max_pixels=max_pixels),
        sampling=dict(temperature=temperature, seed=seed),
        limits=presets.apply(ctx, dict(max_turns=max_turns, max_prompt_tokens=max_prompt_tokens,
                                       max_response_tokens=max_response_tokens, max_total_tokens=max_total_tokens,
                                       max_new_tokens=max_new_tokens), get_profile(protocol).limits),
        protocol=protocol, on_malformed=on_malformed, workflow=workflow, system_prompt=system_prompt,
        tools=dict(search_backend=search_backend, index=index, k=search_k, image_search_backend=image_search_backend,
                   image_index=image_index, cache=cache),
    )
    if as_json:
        with RecordWriter(None) as w:
            w.write(rec, fresh=("tokens", "tool_calls", "elapsed"))
        return
    if rec["prediction"] is None:
        raise MarsError(f"no answer: the episode ended with {rec['finish']}" + (f" ({rec['error']})" if rec.get("error") else ""))
    out = streams.records_out()
    out.write(rec["prediction"].encode("utf-8") + b"\n")
    out.flush()
