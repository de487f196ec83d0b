"""Two-stage search summary through any OpenAI-compatible chat endpoint.

Stage 1 condenses each result page into a few sentences about the query; stage 2
writes one summary over the query, the result snippets and those page summaries.
This is what the agent reads instead of raw pages when --summarize is on: long pages
would otherwise eat its context window.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from mars_cli.errors import MarsError, ToolError
from mars_cli.urls import join, public_url, split_credentials

PAGE_PROMPT = (
    "You help a research assistant that is answering a question with web search.\n"
    "Search query: {query}\n\n"
    "Below is the text of one result page ({title}). Write at most {sentences} sentences that keep "
    "only the facts on this page that bear on the query: names, dates, numbers, places. If the page "
    "says nothing relevant, answer exactly: NOT RELEVANT.\n\n"
    "--- page ---\n{text}\n--- end ---"
)

FINAL_PROMPT = (
    "A search for the query below returned these results. Combine them into one summary of at most "
    "{sentences} sentences that states what the results say about the query, citing result numbers "
    "like [2]. Report disagreements between sources, and say plainly when the results do not answer it. "
    "Do not add facts that are not in the results.\n\n"
    "Query: {query}\n\n{results}"
)


class Summarizer:
    """Calls `POST {base_url}/chat/completions`; the API key comes from the environment only."""

    def __init__(self, base_url: str | None = None, model: str | None = None, *, http=None,
                 page_chars: int = 6000, sentences: int = 4, workers: int = 4):
        from mars_cli.tools.web import HttpClient


        # user:password@ in the URL becomes a header: the URL itself appears in logs.
        self.base_url, self._basic = split_credentials((base_url or os.environ.get("MARS_LLM_BASE_URL") or "").rstrip("/"))
        self.model = model or os.environ.get("MARS_LLM_MODEL")
        if not self.base_url or not self.model:
            raise MarsError("--summarize needs an LLM endpoint: --llm-base-url and --llm-model (or MARS_LLM_BASE_URL, MARS_LLM_MODEL)")
        self._key = os.environ.get("MARS_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.http = http or HttpClient(timeout=60)
        self.page_chars = page_chars
        self.sentences = sentences
        self.workers = workers

    @property
    def params(self) -> dict:
        """What changes a summary (a cache key part); never the key."""
        return {"llm": public_url(self.base_url), "model": self.model, "page_chars": self.page_chars, "sentences": self.sentences}

    def chat(self, prompt: str, max_tokens: int = 400) -> str:
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        if self._basic and not self._key:
            headers = {"Authorization": self._basic}
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0, "max_tokens": max_tokens}
        data = self.http.request_json("POST", join(self.base_url, "/chat/completions"), json=body, headers=headers, what="summarizer")
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ToolError("summarizer: response has no choices[0].message.content") from None
        if not isinstance(text, str) or not text.strip():
            raise ToolError("summarizer: empty completion")
        return text.strip()

    def summarize_page(self, query: str, result: dict) -> str:
        text = (result.get("page") or result.get("text") or "")[: self.page_chars]
        return self.chat(PAGE_PROMPT.format(query=query, title=result.get("title") or "untitled", text=text, sentences=self.sentences))

    def summarize(self, query: str, results: list[dict]) -> tuple[list[str], str]:
        """(one summary per result, the overall summary)."""
        if not results:
            return [], "The search returned no results."
        def page(r: dict) -> str:
            try:
                return self.summarize_page(query, r)
            except ToolError:
                return ""  # this page goes into the final summary by its snippet alone

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            pages = list(pool.map(page, results))
        blocks = []
        for i, (r, s) in enumerate(zip(results, pages), 1):
            snippet = (r.get("snippet") or r.get("text") or "")[:300]
            blocks.append(f"[{i}] {r.get('title') or 'untitled'}\nSnippet: {snippet}" + (f"\nPage summary: {s}" if s else ""))
        final = self.chat(FINAL_PROMPT.format(query=query, results="\n\n".join(blocks), sentences=self.sentences + 2), max_tokens=600)
        return pages, final
