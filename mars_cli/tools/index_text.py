"""The local text index: streamed BM25 build (bm25s on-disk format), optional dense + faiss.

Layout of an index directory (written atomically):
    manifest.json           what was built, from what, with which settings
    passages.jsonl          one passage per line {"id", "title", "text"[, "url"]}
    offsets.i64             byte offset of each passage line (N+1 int64), so a result's
                            text is read with one pread and the texts never sit in RAM
    bm25/                   bm25s's files (data/indices/indptr .npy, vocab, params),
                            loaded memory-mapped with bm25s.BM25.load(mmap=True)
    dense.faiss             optional: IndexFlatIP over L2-normalized passage embeddings

The build streams the corpus in chunks: each chunk's (term, doc, tf) triples go to
scratch files and document frequencies accumulate; a second pass scatters the BM25
weights straight into memory-mapped CSC arrays. Peak memory is one chunk plus the
vocabulary, whatever the corpus size. Scores are bm25s's "lucene" variant; a test
checks them against an index bm25s builds itself.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import orjson

from mars_cli import __version__, streams
from mars_cli.errors import MarsError
from mars_cli.fsutil import atomic_dir, read_manifest

FORMAT = "mars-text-index"
K1, B = 1.5, 0.75
DENSE_WEIGHT = 0.75  # relative-score fusion's weight of the dense list (Weaviate's hybrid default)
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


class Analyzer:
    """Lowercase word tokens, English stop words removed, Snowball-stemmed (PyStemmer)."""

    def __init__(self):
        import Stemmer
        from bm25s.stopwords import STOPWORDS_EN

        self._stem = Stemmer.Stemmer("english").stemWords
        self._stop = frozenset(STOPWORDS_EN)

    def __call__(self, text: str) -> list[str]:
        return self._stem([t for t in _TOKEN.findall(text.lower()) if t not in self._stop])

    def term_ids(self, texts: list[str], vocab: dict[str, int], memo: dict[str, int], memo_cap: int = 2_000_000):
        """(term ids of all texts concatenated, number of terms per text), growing `vocab`.

        The same terms as __call__. Stemming is the slow part of a build and word
        frequencies are Zipfian, so each distinct surface word is stemmed once and kept in
        `memo` (surface word → term id, -1 for a stop word), emptied past memo_cap entries.
        """
        words = [_TOKEN.findall(t.lower()) for t in texts]
        counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        flat = [w for ws in words for w in ws]
        new = set(flat).difference(memo)
        if len(memo) + len(new) > memo_cap:
            memo.clear()
            new = set(flat)
        fresh = sorted(new.difference(self._stop))
        for w, st in zip(fresh, self._stem(fresh)):
            memo[w] = vocab.setdefault(st, len(vocab))
        memo.update(dict.fromkeys(new.intersection(self._stop), -1))
        ids = np.fromiter(map(memo.__getitem__, flat), dtype=np.int64, count=len(flat))
        keep = ids >= 0
        doc = np.repeat(np.arange(len(texts)), counts)
        return ids[keep], np.bincount(doc[keep], minlength=len(texts)).astype(np.int64)


def parse_passage(rec: dict, where) -> dict:
    """A corpus record (FlashRAG `contents` or `title`/`text`) as {"id","title","text"[,"url"]}."""
    pid = rec.get("id", rec.get("doc_id", rec.get("_id")))
    if pid is None:
        pid = f"{where.line}"
    if "contents" in rec:
        contents = rec["contents"]
        if not isinstance(contents, str):
            raise where.error("field 'contents' must be a string")
        # FlashRAG/Search-R1 wiki: the first line is the quoted title.
        head, _, body = contents.partition("\n")
        title, text = head.strip().strip('"').strip(), body.strip()
        if not body:
            title, text = str(rec.get("title") or ""), contents.strip()
    elif "text" in rec:
        title, text = rec.get("title") or "", rec["text"]
        if not isinstance(text, str) or not isinstance(title, str):
            raise where.error("fields 'title' and 'text' must be strings")
    else:
        raise where.error("a passage needs 'contents' or 'text' (and optionally 'title', 'url')")
    out = {"id": str(pid), "title": title, "text": text}
    if isinstance(rec.get("url"), str):
        out["url"] = rec["url"]
    return out


def _chunks(it: Iterable, size: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def build_text_index(
    passages: Iterable[dict],
    out: str | os.PathLike,
    *,
    embedder=None,
    chunk: int = 20_000,
    source: str | None = None,
    total: int | None = None,
    progress: bool = True,
) -> dict:
    """Build an index from parsed passages (see parse_passage); return its manifest.

    `total` (the passage count, when known) gives the progress bar its ETA; `progress=False`
    builds silently (an index that is a step of other work).
    """
    t0 = time.time()
    analyzer = Analyzer()
    with atomic_dir(out) as tmp:
        vocab: dict[str, int] = {}
        memo: dict[str, int] = {}
        df = np.zeros(1024, dtype=np.int64)
        n_docs = n_tokens = 0
        dense = None
        passages_f = open(tmp / "passages.jsonl", "wb")
        offsets_f = open(tmp / "offsets.i64", "wb")
        pair_f = {name: open(tmp / f"pairs.{name}", "wb") for name in ("term", "doc", "tf")}
        doclen_f = open(tmp / "doclen.i32", "wb")
        import hashlib

        digest = hashlib.sha256()
        pos = 0
        offsets_f.write(np.int64(0).tobytes())
        bar = streams.progress(desc="index", unit=" passages", total=total, disable=not progress)
        for batch in _chunks(passages, chunk):
            lines = [orjson.dumps(p) + b"\n" for p in batch]
            blob = b"".join(lines)
            passages_f.write(blob)
            digest.update(blob)
            ends = pos + np.cumsum([len(x) for x in lines], dtype=np.int64)
            pos = int(ends[-1])
            offsets_f.write(ends.tobytes())
            terms, lens = analyzer.term_ids([f"{p['title']} {p['text']}" for p in batch], vocab, memo)
            doclen_f.write(lens.astype(np.int32).tobytes())
            if len(terms):
                v = len(vocab)
                key = np.repeat(np.arange(len(batch), dtype=np.int64), lens) * v + terms
                uniq, tf = np.unique(key, return_counts=True)
                t_ids, d_ids = uniq % v, uniq // v + n_docs
                if v > len(df):
                    df = np.concatenate([df, np.zeros(max(v, 2 * len(df)) - len(df), dtype=np.int64)])
                df[: v] += np.bincount(t_ids, minlength=v)
                pair_f["term"].write(t_ids.astype(np.int32).tobytes())
                pair_f["doc"].write(d_ids.astype(np.int32).tobytes())
                pair_f["tf"].write(tf.astype(np.float32).tobytes())
            if embedder is not None:  # embedding is the slow part: the bar follows its batches
                dense = _add_dense(dense, embedder, batch, bar)
            else:
                bar.update(len(batch))
            n_docs += len(batch)
            n_tokens += len(terms)
        bar.close()
        for f in (passages_f, offsets_f, doclen_f, *pair_f.values()):
            f.close()
        if n_docs == 0:
            raise MarsError("the corpus has no passages")
        df = df[: len(vocab)]
        _write_bm25(tmp, vocab, df, n_docs, n_tokens)
        for name in ("term", "doc", "tf"):
            os.unlink(tmp / f"pairs.{name}")
        if dense is not None:
            import faiss

            faiss.write_index(dense, str(tmp / "dense.faiss"))
        manifest = {
            "format": FORMAT,
            "format_version": 1,
            "mars_version": __version__,
            "source": source,
            "passages_sha256": digest.hexdigest(),
            "passages": n_docs,
            "vocab": len(vocab),
            "tokens": n_tokens,
            "method": "bm25+dense" if dense is not None else "bm25",
            "bm25": {"variant": "lucene", "k1": K1, "b": B, "stemmer": "english", "stopwords": "en"},
            "dense": None if dense is None else _describe(embedder, dense.d),
            "build_seconds": round(time.time() - t0, 3),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _describe(embedder, dim: int) -> dict:
    """The manifest's record of the embedding model: its name, and its path so search can load it."""
    d = embedder.describe() if hasattr(embedder, "describe") else {"model": getattr(embedder, "name", "custom")}
    return {**d, "dim": dim, "faiss": "IndexFlatIP"}


def _add_dense(index, embedder, batch: list[dict], bar):
    import faiss

    texts = [f"{p['title']}\n{p['text']}".strip() for p in batch]
    if getattr(embedder, "reports_progress", False):
        vecs = embedder.encode(texts, kind="passage", on_progress=bar.update)
    else:
        vecs = embedder.encode(texts, kind="passage")
        bar.update(len(batch))
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    if index is None:
        index = faiss.IndexFlatIP(vecs.shape[1])
    faiss.normalize_L2(vecs)
    index.add(vecs)
    return index


def _write_bm25(tmp: Path, vocab: dict, df: np.ndarray, n_docs: int, n_tokens: int, pairs_per_step: int = 1_000_000) -> None:
    """Second pass: scatter BM25 weights into memory-mapped CSC arrays (column = term)."""
    import bm25s

    bdir = tmp / "bm25"
    bdir.mkdir()
    nnz = int(df.sum())
    idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
    doclen = np.fromfile(tmp / "doclen.i32", dtype=np.int32).astype(np.float32)
    avgdl = max(n_tokens / n_docs, 1e-9)
    norm = K1 * (1 - B + B * doclen / avgdl)
    indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    data = np.lib.format.open_memmap(bdir / "data.csc.index.npy", mode="w+", dtype=np.float32, shape=(nnz,))
    indices = np.lib.format.open_memmap(bdir / "indices.csc.index.npy", mode="w+", dtype=np.int32, shape=(nnz,))
    np.save(bdir / "indptr.csc.index.npy", indptr)
    if nnz:
        terms = np.memmap(tmp / "pairs.term", dtype=np.int32, mode="r")
        docs = np.memmap(tmp / "pairs.doc", dtype=np.int32, mode="r")
        tfs = np.memmap(tmp / "pairs.tf", dtype=np.float32, mode="r")
        cursor = indptr[:-1].copy()
        for s in range(0, nnz, pairs_per_step):
            t = np.asarray(terms[s : s + pairs_per_step])
            d = np.asarray(docs[s : s + pairs_per_step])
            tf = np.asarray(tfs[s : s + pairs_per_step])
            # Pairs arrive in doc order; a stable sort by term keeps docs ascending per column.
            order = np.argsort(t, kind="stable")
            ts = t[order]
            rank = np.arange(len(ts)) - np.searchsorted(ts, ts, side="left")
            dest = cursor[ts] + rank
            ds, tfs_ = d[order], tf[order]
            data[dest] = idf[ts] * tfs_ / (tfs_ + norm[ds])
            indices[dest] = ds
            cursor += np.bincount(t, minlength=len(cursor))
        del terms, docs, tfs
    data.flush()
    indices.flush()
    del data, indices
    (bdir / "vocab.index.json").write_bytes(orjson.dumps(vocab))
    params = {"k1": K1, "b": B, "delta": 0.5, "method": "lucene", "idf_method": "lucene", "dtype": "float32",
              "int_dtype": "int32", "num_docs": n_docs, "version": bm25s.__version__, "backend": "numpy"}
    (bdir / "params.index.json").write_text(json.dumps(params, indent=2))
    os.unlink(tmp / "doclen.i32")


class TextIndex:
    """A loaded index: BM25 (memory-mapped) and, when built, dense retrieval. Thread-safe."""

    def __init__(self, path: str | os.PathLike, *, embedder=None):
        import bm25s

        self.path = Path(path)
        self.manifest = read_manifest(self.path, FORMAT, "a text index", {"passages": int, "passages_sha256": str})
        self.bm25 = bm25s.BM25.load(self.path / "bm25", mmap=True, show_progress=False)
        self.vocab = self.bm25.vocab_dict
        self.n = self.manifest["passages"]
        self.offsets = np.memmap(self.path / "offsets.i64", dtype=np.int64, mode="r")
        self._fd = os.open(self.path / "passages.jsonl", os.O_RDONLY)
        self.analyzer = Analyzer()
        self.dense = None
        self.embedder = embedder
        if self.manifest.get("dense"):
            import faiss

            self.dense = faiss.read_index(str(self.path / "dense.faiss"), faiss.IO_FLAG_MMAP)

    def passage(self, i: int) -> dict:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return orjson.loads(os.pread(self._fd, end - start, start))

    def ensure_embedder(self):
        """The embedding model: as given, else loaded from the path the manifest records."""
        if self.embedder is None and self.dense is not None:
            from mars_cli.tools.embed import load_embedder

            rec = self.manifest["dense"]
            where = rec.get("path")
            if not where:
                raise MarsError(f"{self.path}: the index does not record where its embedding model {rec.get('model')!r} is: "
                                "give it with --dense-model PATH (or search with --method bm25)")
            if not Path(where).exists():
                raise MarsError(f"{self.path}: its embedding model {where} does not exist (moved?): give it with "
                                "--dense-model PATH (or search with --method bm25)")
            self.embedder = load_embedder(where)
        return self.embedder

    def bm25_top(self, query: str, k: int) -> list[tuple[int, float]]:
        ids = sorted({self.vocab[t] for t in self.analyzer(query) if t in self.vocab})
        if not ids:
            return []
        scores = self.bm25.get_scores_from_ids(ids)
        return _top(scores, k)

    def dense_top(self, query: str, k: int) -> list[tuple[int, float]]:
        if self.dense is None:
            raise MarsError(f"{self.path}: built without dense vectors (rebuild with --dense-model)")
        embedder = self.ensure_embedder()
        import faiss

        q = np.ascontiguousarray(embedder.encode([query], kind="query"), dtype=np.float32)
        if q.shape[1] != self.dense.d:
            raise MarsError(f"{self.path}: the embedding model gives {q.shape[1]}-dim vectors, the index holds "
                            f"{self.dense.d}-dim ones (built with {self.manifest['dense'].get('model')!r})")
        faiss.normalize_L2(q)
        scores, idx = self.dense.search(q, min(k, self.n))
        return [(int(i), float(s)) for i, s in zip(idx[0], scores[0]) if i >= 0]

    def search(self, query: str, k: int = 5, *, method: str | None = None, fusion: str = "relative",
               dense_weight: float = DENSE_WEIGHT, rrf_k: int = 60) -> list[tuple[int, float]]:
        """(passage number, score) best first. method: bm25, dense, hybrid; default hybrid when the index has vectors.

        Hybrid fuses the top max(50, 4k) of each: `relative` (the default) rescales each
        list's scores to 0–1 (min–max over the list) and sums dense_weight·dense +
        (1 − dense_weight)·bm25, a passage missing from a list counting 0 there; `rrf` sums
        1/(rrf_k + rank). Relative fusion keeps how far apart the scores are, so a weak BM25
        list (a paraphrase shares few words with its article) cannot outvote a confident
        dense one, which rank fusion lets it do.
        """
        method = method or ("hybrid" if self.dense is not None else "bm25")
        if method == "bm25":
            return self.bm25_top(query, k)
        if method == "dense":
            return self.dense_top(query, k)
        if method != "hybrid":
            raise MarsError(f"unknown retrieval method {method!r} (bm25, dense, hybrid)")
        depth = max(50, 4 * k)
        lists = (self.bm25_top(query, depth), self.dense_top(query, depth))
        fused: dict[int, float] = {}
        if fusion == "rrf":
            for ranked in lists:
                for r, (i, _) in enumerate(ranked):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (rrf_k + r + 1)
        elif fusion == "relative":
            for ranked, w in zip(lists, (1.0 - dense_weight, dense_weight)):
                if not ranked:
                    continue
                hi, lo = ranked[0][1], ranked[-1][1]
                for i, score in ranked:
                    fused[i] = fused.get(i, 0.0) + w * ((score - lo) / (hi - lo) if hi > lo else 1.0)
        else:
            raise MarsError(f"unknown fusion {fusion!r} (relative, rrf)")
        return sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]

    def close(self) -> None:
        os.close(self._fd)


def _top(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (index, score) with score > 0, ties broken by the lower index.

    np.partition finds the k-th best value in one pass; only the few passages at or above
    it are sorted. Twice as fast as argpartition on the negated array, and deterministic
    on ties (which argpartition is not).
    """
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return []
    kth = np.partition(scores, n - k)[n - k]
    cand = np.flatnonzero(scores >= kth) if kth > 0 else np.flatnonzero(scores > 0)
    cand = cand[np.lexsort((cand, -scores[cand]))][:k]
    return [(int(i), float(scores[i])) for i in cand]
