"""Text search for the agent and `mars search`: one interface over four backends.

    ts = open_text_search("local", index="wiki-index/")
    results = ts.search("who painted the ceiling", k=5)   # ranked dicts
    block = render_text_results(query, results)          # what the agent reads

Backends: `local` (our BM25/dense index), `serper` (Google via serper.dev, then the top
pages fetched and reduced to text), `searxng` (a self-hosted SearXNG JSON API) and
`retriever` (the Search-R1 retrieval-server protocol). Each result is
{rank, title, text, url or doc_id, score, backend}. Every call goes through the
record/replay cache when one is configured; failures raise ToolError.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from mars_cli.errors import MarsError, ToolError
from mars_cli.tools.cache import ToolCache, open_cache
from mars_cli.urls import join, public_url

BACKENDS = ("local", "serper", "searxng", "retriever")
MAX_K = 50


def _http(opts: dict):
    from mars_cli.tools.web import HttpClient

    keys = ("timeout", "retries", "backoff", "max_wait", "max_bytes", "rate_limit", "allow_private")
    return HttpClient(**{k: opts[k] for k in keys if opts.get(k) is not None})


def _url(opts: dict, name: str, env: str, default: str | None = None) -> str:
    url = opts.get(name) or os.environ.get(env) or default
    if not url:
        flag = "--" + name.replace("_", "-")
        raise MarsError(f"this backend needs {flag} (or {env})")
    return url.rstrip("/")


class LocalBackend:
    name = "local"

    def __init__(self, index: str | None, opts: dict):
        from mars_cli.tools.embed import load_embedder
        from mars_cli.tools.index_text import TextIndex

        index = index or os.environ.get("MARS_INDEX")
        if not index:
            raise MarsError("the local backend needs an index: --index DIR (or MARS_INDEX); build one with `mars index text`")
        embedder = opts.get("embedder")
        if embedder is None and opts.get("dense_model"):
            embedder = load_embedder(opts["dense_model"])
        self.index = TextIndex(index, embedder=embedder)
        self.method = opts.get("method")
        if self.method not in (None, "bm25", "dense", "hybrid"):
            raise MarsError(f"unknown retrieval method {self.method!r} (bm25, dense, hybrid)")
        if self.method in ("dense", "hybrid") and self.index.dense is None:
            raise MarsError(f"--method {self.method} needs an index built with --dense-model (this one has no vectors)")
        if self.method != "bm25" and self.index.dense is not None:
            # Hybrid by default: the model the index records is loaded now, once, and stays
            # resident for every query; a missing model is an error, never a quiet BM25.
            embedder = self.index.ensure_embedder()
        # The corpus hash (not the path) keys the cache: a rebuilt index is a new corpus.
        self.params = {"index": self.index.manifest["passages_sha256"], "method": self.method,
                       "dense": None if embedder is None or self.method == "bm25" else getattr(embedder, "name", None)}

    def search(self, query: str, k: int) -> list[dict]:
        out = []
        for rank, (i, score) in enumerate(self.index.search(query, k, method=self.method), 1):
            p = self.index.passage(i)
            r = {"rank": rank, "title": p["title"], "text": p["text"], "doc_id": p["id"], "score": round(score, 6), "backend": "local"}
            if "url" in p:
                r["url"] = p["url"]
            out.append(r)
        return out


class _WebBackend:
    """Shared by serper and searxng: optional fetch of each result page's text."""

    def __init__(self, opts: dict):
        self.http = _http(opts)
        self.fetch = opts.get("fetch", True)
        self.page_chars = int(opts.get("page_chars") or 4000)
        self.workers = int(opts.get("workers") or 4)

    def _finish(self, hits: list[dict], k: int) -> list[dict]:
        """hits: {title, url, snippet}; adds rank, text (the page or the snippet), score."""
        hits = hits[:k]
        pages: list = [None] * len(hits)
        if self.fetch and hits:
            def one(h):
                try:
                    return self.http.fetch_text(h["url"], max_chars=self.page_chars), None
                except ToolError as e:
                    return None, str(e)

            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                pages = list(pool.map(one, hits))
        out = []
        for rank, (h, page) in enumerate(zip(hits, pages), 1):
            r = {"rank": rank, "title": h["title"], "text": h["snippet"], "url": h["url"],
                 "score": round(1.0 / rank, 6), "backend": self.name, "snippet": h["snippet"]}
            if page is not None:
                text, err = page
                if text:
                    r["text"] = text
                else:
                    r["fetch_error"] = err
            out.append(r)
        return out


class SerperBackend(_WebBackend):
    name = "serper"

    def __init__(self, opts: dict):
        super().__init__(opts)
        self.url = _url(opts, "serper_url", "MARS_SERPER_URL", "https://google.serper.dev")
        self._key = os.environ.get("SERPER_API_KEY")
        if not self._key and not opts.get("replay"):  # replaying needs no key: the cache answers
            raise MarsError("the serper backend needs SERPER_API_KEY in the environment")
        self.params = {"url": public_url(self.url), "fetch": self.fetch, "page_chars": self.page_chars}

    def search(self, query: str, k: int) -> list[dict]:
        data = self.http.request_json("POST", join(self.url, "/search"), json={"q": query, "num": k},
                                      headers={"X-API-KEY": self._key}, what="serper search")
        # serper leaves "organic" out when nothing matched
        organic = data.get("organic", []) if isinstance(data, dict) else None
        if not isinstance(organic, list):
            raise ToolError("serper search: unexpected response (no 'organic' list)")
        hits = [{"title": str(o.get("title") or ""), "url": o["link"], "snippet": str(o.get("snippet") or "")}
                for o in organic if isinstance(o, dict) and isinstance(o.get("link"), str)]
        return self._finish(hits, k)


class SearxngBackend(_WebBackend):
    name = "searxng"

    def __init__(self, opts: dict):
        opts = {"fetch": False, **opts}  # SearXNG snippets are usually enough; fetch is opt-in
        super().__init__(opts)
        self.url = _url(opts, "searxng_url", "MARS_SEARXNG_URL")
        self.params = {"url": public_url(self.url), "fetch": self.fetch, "page_chars": self.page_chars}

    def search(self, query: str, k: int) -> list[dict]:
        data = self.http.request_json("GET", join(self.url, "/search"), params={"q": query, "format": "json"}, what="searxng search")
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            raise ToolError("searxng search: unexpected response (no 'results' list)")
        hits = [{"title": str(o.get("title") or ""), "url": o["url"], "snippet": str(o.get("content") or "")}
                for o in results if isinstance(o, dict) and isinstance(o.get("url"), str)]
        return self._finish(hits, k)


class RetrieverBackend:
    """A Search-R1 retrieval server; the URL names its /retrieve route or the server's base."""

    name = "retriever"

    def __init__(self, opts: dict):
        from urllib.parse import urlsplit, urlunsplit

        self.http = _http(opts)
        base = _url(opts, "retriever_url", "MARS_RETRIEVER_URL")
        # Search-R1's own clients are given the route itself (…/retrieve): either form works.
        parts = urlsplit(base)
        if parts.path.rstrip("/").endswith("/retrieve"):
            base = urlunsplit(parts._replace(path=parts.path.rstrip("/")[: -len("/retrieve")]))
        self.url = join(base, "/retrieve")
        self.params = {"url": public_url(base)}  # the server's base, as cache keys have always named it

    def search(self, query: str, k: int) -> list[dict]:
        what = f"retriever {public_url(self.url)}"
        try:
            data = self.http.request_json("POST", self.url, json={"queries": [query], "topk": k, "return_scores": True},
                                          what=what)
        except ToolError as e:
            if str(e).endswith("HTTP 404"):
                raise ToolError(f"{e}: no retrieval server route there (--retriever-url names the server, or its /retrieve)") from None
            raise
        try:
            items = data["result"][0]
        except (KeyError, IndexError, TypeError):
            raise ToolError("retriever: unexpected response (no result[0] list)") from None
        if not isinstance(items, list):
            raise ToolError("retriever: unexpected response (result[0] is not a list)")
        out = []
        for rank, item in enumerate(items[:k], 1):
            doc = item.get("document", item) if isinstance(item, dict) else None
            if not isinstance(doc, dict) or not isinstance(doc.get("contents", doc.get("text")), str):
                raise ToolError(f"retriever: result {rank} has no document contents")
            contents = doc.get("contents", doc.get("text"))
            head, _, body = contents.partition("\n")
            title, text = (head.strip().strip('"'), body.strip()) if body else (str(doc.get("title") or ""), contents)
            score = item.get("score", 1.0 / rank)
            out.append({"rank": rank, "title": title, "text": text, "doc_id": str(doc.get("id", rank)),
                        "score": float(score) if isinstance(score, (int, float)) else 1.0 / rank, "backend": "retriever"})
        return out


class _SummaryFailed(Exception):
    def __init__(self, reason: str, results: list[dict]):
        super().__init__(reason)
        self.reason, self.results = reason, results


class TextSearch:
    """A configured text search: backend + optional summarizer + optional cache. Thread-safe."""

    def __init__(self, backend, *, cache: ToolCache | None = None, summarizer=None):
        self.backend = backend
        self.cache = cache
        self.summarizer = summarizer

    @property
    def params(self) -> dict:
        p = {"backend": self.backend.name, **self.backend.params}
        if self.summarizer is not None:
            p["summary"] = self.summarizer.params
        return p

    def _run(self, query: str, k: int) -> list[dict]:
        results = self.backend.search(query, k)
        if self.summarizer is not None and results:
            try:
                pages, overall = self.summarizer.summarize(query, results)
            except ToolError as e:  # the results are still worth reading; not cached
                raise _SummaryFailed(str(e), results) from None
            for r, s in zip(results, pages):
                r["summary"] = s
                r["query_summary"] = overall
        return results

    def search(self, query: str, k: int = 5) -> list[dict]:
        """Ranked results for `query`; ToolError when the call fails or finds nothing."""
        if not isinstance(query, str) or not query.strip():
            raise ToolError("text search needs a non-empty query string")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise ToolError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        query = " ".join(query.split())
        try:
            if self.cache is None:
                results = self._run(query, k)
            else:
                results = self.cache.wrap("text_search", lambda: self._run(query, k), {"query": query, "k": k}, self.params)
        except _SummaryFailed as e:
            from mars_cli import streams

            streams.warn(f"{e.reason}; using the results of {query!r} without a summary")
            results = e.results
        if not results:
            raise ToolError(f"no results for {query!r}")
        return results


def open_text_search(backend: str = "local", *, index: str | None = None, cache=None, replay: bool = False,
                     summarize: bool = False, **opts) -> TextSearch:
    """A TextSearch for `backend`; `cache` is a directory (or a ToolCache to share)."""
    backend = backend or os.environ.get("MARS_SEARCH_BACKEND") or "local"
    opts["replay"] = replay
    if backend == "local":
        impl = LocalBackend(index, opts)
    elif backend == "serper":
        impl = SerperBackend(opts)
    elif backend == "searxng":
        impl = SearxngBackend(opts)
    elif backend == "retriever":
        impl = RetrieverBackend(opts)
    else:
        raise MarsError(f"unknown text search backend {backend!r} (choose from {', '.join(BACKENDS)})")
    summarizer = None
    if summarize:
        from mars_cli.tools.summarize import Summarizer

        summarizer = Summarizer(opts.get("llm_base_url"), opts.get("llm_model"), http=_http({**opts, "timeout": opts.get("llm_timeout") or opts.get("timeout") or 60}))
    tool_cache = cache if isinstance(cache, ToolCache) else open_cache(cache, replay=replay)
    return TextSearch(impl, cache=tool_cache, summarizer=summarizer)


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    if len(text) <= n:
        return text
    return text[: max(0, n - 1)].rstrip() + "…"


def render_text_results(query: str, results: list[dict], *, budget_chars: int = 3000) -> str:
    """The block the agent reads: a fixed layout, never longer than budget_chars.

    Each result gets a header line `[n] Title (url or doc id)` and an equal share of the
    remaining budget for its text (the page summary when there is one). With a
    summarizer, the overall summary comes first and takes half the budget.
    """
    head = f'Search results for "{_clip(query, 200)}":'
    if not results:
        return (head + "\nNo results.")[:budget_chars]
    lines = [head]
    overall = results[0].get("query_summary")
    if overall:
        lines.append("Summary: " + _clip(overall, max(0, budget_chars // 2 - len(head))))
    used = sum(len(x) + 1 for x in lines)
    share = max(0, (budget_chars - used) // len(results))
    for r in results:
        where = r.get("url") or (f"doc {r['doc_id']}" if r.get("doc_id") is not None else "")
        title = f"[{r.get('rank', '?')}] {_clip(r.get('title') or 'untitled', 120)}" + (f" ({_clip(where, 120)})" if where else "")
        title = _clip(title, max(0, share - 1))
        body = _clip(r.get("summary") or r.get("text") or "", max(0, share - len(title) - 2))
        block = title + ("\n" + body if body else "")
        if block:
            lines.append(block)
    return "\n".join(lines)[:budget_chars]


def search_records(items, ts: TextSearch, *, k: int = 5, group: bool = False, budget_chars: int = 3000, failures: list | None = None,
                   warn: bool = True):
    """For `mars search`: (where, record with "query") → result records.

    One record per result (the input's fields, then "query" and the result's fields), or
    with group=True one per query with "results" and "context" (the rendered block).
    A failed query is warned about and appended to `failures`; the stream goes on.
    """
    from mars_cli import streams

    for where, rec in items:
        query = rec.get("query")
        if not isinstance(query, str):
            raise where.error("a query record needs a string field 'query'")
        try:
            results = ts.search(query, k)
        except ToolError as e:
            if warn:
                streams.warn(f"{where}: {e}")
            if failures is not None:
                failures.append(str(e))
            if group:
                yield {**rec, "results": [], "context": render_text_results(query, [], budget_chars=budget_chars), "error": str(e)}
            continue
        if group:
            yield {**rec, "results": results, "context": render_text_results(query, results, budget_chars=budget_chars)}
        else:
            for r in results:
                yield {**rec, **r}
