"""Reverse image search for the agent and `mars image-search`.

    search = open_image_search("local", index="photo-idx/")
    results = search.search("artifacts/3f…e1.jpg", k=5)   # any image: the original or a crop
    text, thumbs = render_image_results(results)         # what the agent reads and sees

Backends: `local` (an index from `mars index images`), `precomputed` (results stored on
the task record, as in the official data: image_search_title_list /
image_search_thumbnail_list) and `serper` (Google Lens through serper.dev; it needs a
public image URL). Results: {rank, title, thumbnail (a local path), score, backend}.
"""

from __future__ import annotations

import os
from pathlib import Path

from mars_cli.errors import MarsError, ToolError
from mars_cli.fsutil import sha256_file
from mars_cli.tools.cache import ToolCache, open_cache
from mars_cli.urls import join, public_url

BACKENDS = ("local", "precomputed", "serper")
MAX_K = 20


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


class LocalImageBackend:
    name = "local"

    def __init__(self, index: str | None, opts: dict):
        from mars_cli.tools.index_images import ImageIndex
        from mars_cli.tools.embed import load_embedder

        index = index or os.environ.get("MARS_IMAGE_INDEX")
        if not index:
            raise MarsError("the local image backend needs an index: --index DIR (or MARS_IMAGE_INDEX); build one with `mars index images`")
        embedder = opts.get("embedder") or (load_embedder(opts["model"], images=True) if opts.get("model") else None)
        self.index = ImageIndex(index, embedder=embedder)
        self.params = {"index": self.index.manifest["items_sha256"], "descriptor": self.index.manifest["descriptor"]}

    def search(self, image: str, k: int, task: dict | None) -> list[dict]:
        if _is_url(image):
            raise ToolError("local image search needs a local image file, not a URL")
        try:
            ranked = self.index.search(image, k)
        except MarsError as e:
            raise ToolError(str(e)) from None  # "PATH: what is wrong", as every image error reads
        return [{"rank": r, "title": self.index.items[i]["title"], "thumbnail": self.index.thumbnail(i),
                 "score": round(s, 6), "backend": "local"} for r, (i, s) in enumerate(ranked, 1)]


class PrecomputedBackend:
    """Results recorded with the task; the same list whichever of the task's images is searched."""

    name = "precomputed"

    def __init__(self, opts: dict):
        self.data_dir = opts.get("data_dir")
        self.params = {}

    def search(self, image: str, k: int, task: dict | None) -> list[dict]:
        if task is None:
            raise ToolError("precomputed image search needs the task record (its image_search_* fields)")
        titles = task.get("image_search_title_list") or (task.get("meta") or {}).get("image_search_title_list")
        thumbs = task.get("image_search_thumbnail_list") or (task.get("meta") or {}).get("image_search_thumbnail_list")
        if not titles or not thumbs:
            raise ToolError("no precomputed image search results for this task")
        if len(titles) != len(thumbs):
            raise ToolError(f"precomputed results disagree: {len(titles)} titles, {len(thumbs)} thumbnails")
        base = self.data_dir or task.get("data_dir") or (task.get("meta") or {}).get("data_dir") or "."
        out = []
        for rank, (title, thumb) in enumerate(list(zip(titles, thumbs))[:k], 1):
            path = thumb if _is_url(thumb) or os.path.isabs(thumb) else os.path.join(base, thumb)
            out.append({"rank": rank, "title": str(title), "thumbnail": path, "score": round(1.0 / rank, 6), "backend": "precomputed"})
        return out


class SerperLensBackend:
    name = "serper"

    def __init__(self, opts: dict):
        from mars_cli.tools.text_search import _http, _url

        self.http = _http(opts)
        self.url = _url(opts, "serper_url", "MARS_SERPER_URL", "https://google.serper.dev")
        self._key = os.environ.get("SERPER_API_KEY")
        if not self._key and not opts.get("replay"):  # replaying needs no key: the cache answers
            raise MarsError("the serper backend needs SERPER_API_KEY in the environment")
        self.out_dir = Path(opts.get("artifacts") or os.environ.get("MARS_ARTIFACTS") or "artifacts")
        self.params = {"url": public_url(self.url)}

    def search(self, image: str, k: int, task: dict | None) -> list[dict]:
        if not _is_url(image):
            raise ToolError(f"serper (Google Lens) searches images by public URL; {image} is a local file "
                            "(use the local or precomputed backend, or give the image's URL)")
        data = self.http.request_json("POST", join(self.url, "/lens"), json={"url": image}, headers={"X-API-KEY": self._key}, what="serper lens")
        hits = None
        if isinstance(data, dict):
            hits = next((data[f] for f in ("organic", "visualMatches", "visual_matches") if isinstance(data.get(f), list)), None)
        if hits is None:
            raise ToolError("serper lens: unexpected response (no 'organic' list)")
        out = []
        for h in hits:
            if len(out) >= k:
                break
            url = h.get("thumbnailUrl") or h.get("imageUrl") if isinstance(h, dict) else None
            if not isinstance(url, str):
                continue
            try:
                path = self._save_thumbnail(url)
            except ToolError:
                continue  # a dead thumbnail is skipped, not a failed search
            out.append({"rank": len(out) + 1, "title": str(h.get("title") or ""), "thumbnail": path,
                        "score": round(1.0 / (len(out) + 1), 6), "backend": "serper", "url": h.get("link")})
        return out

    def _save_thumbnail(self, url: str) -> str:
        import io

        from PIL import Image

        body, _, _ = self.http.get_bytes(url, what=f"thumbnail {url}")
        try:
            with Image.open(io.BytesIO(body)) as im:
                im.verify()
        except Exception:
            raise ToolError(f"thumbnail {url}: not an image") from None
        from mars_cli.spool import store

        return str(store(self.out_dir, body, ".img"))


class ImageSearch:
    """A configured image search (backend + optional cache). Thread-safe."""

    def __init__(self, backend, *, cache: ToolCache | None = None):
        self.backend = backend
        self.cache = cache

    def search(self, image: str, k: int = 5, *, task: dict | None = None) -> list[dict]:
        """Ranked results for `image` (a path or URL); ToolError when the call fails or finds nothing."""
        if not isinstance(image, str) or not image:
            raise ToolError("image search needs an image path")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise ToolError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        if self.cache is None or self.backend.name == "precomputed":
            results = self.backend.search(image, k, task)
        else:
            # Key by content, not path: the same crop under another name is the same call.
            if _is_url(image):
                ident = image
            else:
                try:
                    ident = sha256_file(image)
                except OSError as e:
                    raise ToolError(f"cannot read {image}: {e.strerror}") from None
            params = {"backend": self.backend.name, **self.backend.params}
            results = self.cache.wrap("image_search", lambda: self.backend.search(image, k, task), {"image": ident, "k": k}, params)
        if not results:
            raise ToolError("the image search found no results")
        return results


def open_image_search(backend: str = "local", *, index: str | None = None, cache=None, replay: bool = False, **opts) -> ImageSearch:
    """An ImageSearch for `backend`; `cache` is a directory (or a ToolCache to share)."""
    backend = backend or os.environ.get("MARS_IMAGE_SEARCH_BACKEND") or "local"
    opts["replay"] = replay
    if backend == "local":
        impl = LocalImageBackend(index, opts)
    elif backend == "precomputed":
        impl = PrecomputedBackend(opts)
    elif backend == "serper":
        impl = SerperLensBackend(opts)
    else:
        raise MarsError(f"unknown image search backend {backend!r} (choose from {', '.join(BACKENDS)})")
    tool_cache = cache if isinstance(cache, ToolCache) else open_cache(cache, replay=replay)
    return ImageSearch(impl, cache=tool_cache)


def render_image_results(results: list[dict]) -> tuple[str, list[str]]:
    """("Reverse Image Search Results:\\nTitle 1: …\\nThumbnail 1:" …, thumbnail paths in order).

    Each "Thumbnail n:" line is followed, in the tool message, by the n-th image.
    """
    if not results:
        return "Reverse Image Search Results:\nNo results.", []
    lines, thumbs = ["Reverse Image Search Results:"], []
    for n, r in enumerate(results, 1):
        lines.append(f"Title {n}: {' '.join(str(r.get('title') or 'untitled').split())[:200]}")
        if r.get("thumbnail"):
            lines.append(f"Thumbnail {n}:")
            thumbs.append(r["thumbnail"])
    return "\n".join(lines), thumbs


def image_search_records(items, search: ImageSearch, *, k: int = 5, group: bool = False, failures: list | None = None, warn: bool = True):
    """For `mars image-search`: (where, record with "image" or "images") → result records."""
    from mars_cli import streams

    for where, rec in items:
        image = rec.get("image") or (rec.get("images") or [None])[0]
        if not isinstance(image, str):
            raise where.error("a record needs a string field 'image' or a non-empty 'images' list")
        try:
            results = search.search(image, k, task=rec)
        except ToolError as e:
            if warn:
                streams.warn(f"{where}: {e}")
            if failures is not None:
                failures.append(str(e))
            if group:
                yield {**rec, "image_results": [], "error": str(e)}
            continue
        if group:
            text, thumbs = render_image_results(results)
            yield {**rec, "image_results": results, "context": text, "thumbnails": thumbs}
        else:
            for r in results:
                yield {**rec, "image": image, **r}
