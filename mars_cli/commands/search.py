"""`mars search`: text search from the shell, the same code the agent's tool runs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mars_cli.flags import renamed


@renamed({"--output": "--out", "--top-k": "--num-results"})
def main(
    query: Optional[List[str]] = typer.Argument(None, help="The query (words are joined) (default: {\"query\"} records on stdin)."),
    backend: str = typer.Option("local", "--backend", "-b", envvar="MARS_SEARCH_BACKEND", help="local, serper, searxng or retriever."),
    index: Optional[Path] = typer.Option(None, "--index", envvar="MARS_INDEX", help="Index directory for the local backend."),
    k: int = typer.Option(5, "-k", "--num-results", min=1, max=50, help="Number of results per query."),
    group: bool = typer.Option(False, "--group", help="One record per query (results + rendered context) instead of one per result."),
    method: Optional[str] = typer.Option(None, "--method", help="local retrieval: bm25, dense or hybrid [default: hybrid when the index has vectors, else bm25]."),
    dense_model: Optional[Path] = typer.Option(None, "--dense-model", envvar="MARS_DENSE_MODEL", help="Embedding model for dense/hybrid retrieval [default: the path the index records]."),
    serper_url: Optional[str] = typer.Option(None, "--serper-url", envvar="MARS_SERPER_URL", help="serper.dev base URL (key from SERPER_API_KEY)."),
    searxng_url: Optional[str] = typer.Option(None, "--searxng-url", envvar="MARS_SEARXNG_URL", help="SearXNG base URL."),
    retriever_url: Optional[str] = typer.Option(None, "--retriever-url", envvar="MARS_RETRIEVER_URL", help="Search-R1 retrieval server URL (…/retrieve, or its base)."),
    summarize: bool = typer.Option(False, "--summarize", help="Two-stage LLM summary of the results (key from MARS_LLM_API_KEY or OPENAI_API_KEY)."),
    llm_base_url: Optional[str] = typer.Option(None, "--llm-base-url", envvar="MARS_LLM_BASE_URL", help="OpenAI-compatible endpoint for --summarize."),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", envvar="MARS_LLM_MODEL", help="Model name for --summarize."),
    cache: Optional[Path] = typer.Option(None, "--cache", envvar="MARS_CACHE", help="Record/replay cache directory."),
    replay: bool = typer.Option(False, "--replay", help="Answer from the cache only; a miss is an error."),
    rate_limit: Optional[float] = typer.Option(None, "--rate-limit", min=0.001, help="At most N API calls per second."),
    timeout: float = typer.Option(20.0, "--timeout", min=0.01, help="Seconds per HTTP request."),
    retries: int = typer.Option(3, "--retries", min=0, help="Retries on timeouts, 429 and 5xx (exponential backoff)."),
    backoff: float = typer.Option(0.5, "--backoff", min=0.0, help="Seconds before the first retry (doubled each time)."),
    allow_private: bool = typer.Option(False, "--allow-private", help="Allow fetching result pages on private/loopback addresses."),
    budget: int = typer.Option(3000, "--budget", min=100, help="Character budget of the rendered context (--group)."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here (atomically) instead of stdout."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unparsable input lines with a warning."),
    serve: bool = typer.Option(False, "--serve", help="Serve the local index over the Search-R1 retriever protocol (POST /retrieve) until Ctrl-C."),
    host: str = typer.Option("127.0.0.1", "--host", envvar="MARS_RETRIEVER_HOST", help="--serve: address to bind (0.0.0.0 exposes the index to the network)."),
    port: int = typer.Option(8001, "--port", min=0, max=65535, envvar="MARS_RETRIEVER_PORT", help="--serve: TCP port (0: any free one)."),
) -> None:
    """Search text: a local index, the web, or a retrieval server.

    With a QUERY, prints one record per result {query, rank, title, text, url or doc_id, score, backend}. Without one, reads stdin: {"query": …} records get the results added (every other field passes through), and a plain-text line is a query of its own. A query that fails (timeout, no results, replay miss) is reported on stderr; the others are still written, and the exit status is 1.

    With --serve, answers POST /retrieve in the Search-R1 retriever protocol from the local index (the embedding model loaded once), for `--backend retriever`, Search-R1, verl or SenseNova-MARS training. Once listening it prints one JSON line {url, index, passages, method, model} on stdout; -k is the default topk.

    Example: mars index text wiki.jsonl --out wiki-idx && mars search --index wiki-idx "eiffel tower height"
    """
    from mars_cli.errors import MarsError
    from mars_cli.inputs import query_items
    from mars_cli.jsonl import RecordWriter, Where
    from mars_cli.tools.text_search import open_text_search, search_records

    ts = open_text_search(backend, index=str(index) if index else None, cache=str(cache) if cache else None, replay=replay,
                          summarize=summarize, method=method, dense_model=str(dense_model) if dense_model else None,
                          serper_url=serper_url, searxng_url=searxng_url, retriever_url=retriever_url,
                          llm_base_url=llm_base_url, llm_model=llm_model, rate_limit=rate_limit, timeout=timeout,
                          retries=retries, backoff=backoff, allow_private=allow_private)
    if serve:
        from mars_cli.errors import UsageError
        from mars_cli.streams import warn
        from mars_cli.tools.retriever_server import RetrieverServer

        if query or ts.backend.name != "local":
            raise UsageError("--serve serves a local index (--index DIR) and takes no query")
        server = RetrieverServer(ts.backend.index, host=host, port=port, method=method, default_k=k)
        with RecordWriter() as w:  # the ready line, as `mars serve` prints one
            w.write(server.describe())
        warn(f"serving {index or 'MARS_INDEX'} ({server.method}) on {server.url}/retrieve; Ctrl-C stops")
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C is how a server is meant to stop
            warn("stopped")
        finally:
            server.server_close()
        return
    items = [(Where("<args>", 1), {"query": " ".join(query)})] if query else query_items(skip_bad=skip_bad)
    failures: list[str] = []
    with RecordWriter(output) as w:
        for rec in search_records(items, ts, k=k, group=group, budget_chars=budget, failures=failures, warn=not query):
            w.write(rec)
    if failures:
        raise MarsError(failures[0] if query else f"{len(failures)} of the queries failed (see above)")
