"""Search benchmark: BM25 index build + query latency, dense top-k with faiss vs numpy.

    .venv/bin/python bench/search.py                 # 200k passages, 100k vectors
    .venv/bin/python bench/search.py --passages 20000 --vectors 20000   # quick look

Prints one JSON line of figures on stdout and a table on stderr. The corpus is generated
(Zipf-distributed pseudo-words, 40–120 words a passage), so it runs offline; queries
are 2–5 words drawn from random passages. Dense: random unit vectors, single-query, one-core
top-10 with faiss IndexFlatIP and with a numpy matmul + argpartition, same queries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

# Single-query latency on one core for both contenders: set before numpy loads its BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pseudo_words(n: int, rng) -> list[str]:
    cons, vow = list("bcdfghjklmnprstvz"), list("aeiou")
    out, seen = [], set()
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.integers(2, 5)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def passages(n: int, vocab: list[str], rng, block: int = 5000):
    """Generated lazily, a block at a time, so the generator itself holds little memory."""
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks**1.05
    p /= p.sum()
    words_of = np.asarray(vocab, dtype=object)
    for start in range(0, n, block):
        lengths = rng.integers(40, 121, min(block, n - start))
        words = words_of[rng.choice(len(vocab), size=int(lengths.sum()), p=p)]
        pos = 0
        for i, L in enumerate(lengths):
            toks = words[pos : pos + L]
            pos += L
            yield {"id": f"p{start + i}", "title": " ".join(toks[:3]), "text": " ".join(toks[3:])}


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=200_000)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=20_000, help="passages per streamed build chunk")
    args = ap.parse_args()

    from mars_cli.tools.index_text import TextIndex, build_text_index
    from mars_cli.tools.text_search import open_text_search

    rng = np.random.default_rng(args.seed)
    vocab = pseudo_words(50_000, rng)
    tmp = Path(tempfile.mkdtemp(prefix="mars-bench-"))
    anon0 = rss_anon_mb()
    peak = [anon0]
    done = threading.Event()

    def sample():  # anonymous memory only: the memory-mapped index files are page cache
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_anon_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    manifest = build_text_index(passages(args.passages, vocab, rng), tmp / "idx", chunk=args.chunk)
    build_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    build_peak_mb = peak[0] - anon0

    ix = TextIndex(tmp / "idx")
    queries = []
    for _ in range(args.queries):
        words = ix.passage(int(rng.integers(ix.n)))["text"].split()
        queries.append(" ".join(rng.choice(words, size=int(rng.integers(2, 6)), replace=False)))
    for q in queries[:20]:  # warm the page cache and numpy
        ix.bm25_top(q, 10)
    lat, lat_cpu = [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        ix.bm25_top(q, 10)
        lat.append(time.perf_counter() - t)
        lat_cpu.append(time.process_time() - c)
    ts = open_text_search("local", index=str(tmp / "idx"))
    full = []
    for q in queries:
        t = time.perf_counter()
        ts.search(q, 5)
        full.append(time.perf_counter() - t)

    import faiss

    faiss.omp_set_num_threads(1)
    vecs = rng.standard_normal((args.vectors, args.dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    fx = faiss.IndexFlatIP(args.dim)
    fx.add(vecs)
    qs = rng.standard_normal((200, args.dim), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    f_lat, n_lat, f_cpu, n_cpu, agree = [], [], [], [], 0
    for q in qs:
        t, c = time.perf_counter(), time.process_time()
        _, fi = fx.search(q[None, :], 10)
        f_lat.append(time.perf_counter() - t)
        f_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        s = vecs @ q
        top = np.argpartition(-s, 10)[:10]
        top = top[np.argsort(-s[top])]
        n_lat.append(time.perf_counter() - t)
        n_cpu.append(time.process_time() - c)
        agree += int(list(fi[0]) == list(top))

    fig = {
        "bench": "search", "passages": args.passages, "vocab": manifest["vocab"], "tokens": manifest["tokens"],
        "bm25_build_s": round(build_s, 2), "bm25_build_peak_anon_mb": round(build_peak_mb, 1), "bm25_build_passages_per_s": round(args.passages / build_s),
        "bm25_query_p50_ms": round(pct(lat, 50), 3), "bm25_query_p99_ms": round(pct(lat, 99), 3),
        "bm25_query_cpu_p50_ms": round(pct(lat_cpu, 50), 3), "bm25_target_p50_le_5ms": pct(lat, 50) <= 5.0,
        "search_call_p50_ms": round(pct(full, 50), 3), "search_call_p99_ms": round(pct(full, 99), 3),
        "dense_vectors": args.vectors, "dense_dim": args.dim,
        "faiss_p50_ms": round(pct(f_lat, 50), 3), "faiss_p99_ms": round(pct(f_lat, 99), 3),
        "numpy_p50_ms": round(pct(n_lat, 50), 3), "numpy_p99_ms": round(pct(n_lat, 99), 3),
        "faiss_cpu_p50_ms": round(pct(f_cpu, 50), 3), "numpy_cpu_p50_ms": round(pct(n_cpu, 50), 3),
        "numpy_over_faiss_p50": round(pct(n_lat, 50) / pct(f_lat, 50), 2), "topk_agreement": agree / len(qs),
    }
    load = os.getloadavg()[0]
    fig["load_average"] = round(load, 2)  # wall times on a shared machine: read them with this
    print(json.dumps(fig), flush=True)
    rows = [("BM25 build", f"{build_s:.1f} s", f"{args.passages / build_s:,.0f} passages/s"),
            ("  (memory)", f"+{build_peak_mb:.0f} MB anon", f"chunk {args.chunk}"),
            ("BM25 top-10", f"p50 {fig['bm25_query_p50_ms']} ms", f"p99 {fig['bm25_query_p99_ms']} ms"),
            ("  (cpu)", f"p50 {fig['bm25_query_cpu_p50_ms']} ms", f"load avg {load:.1f}"),
            ("search() k=5", f"p50 {fig['search_call_p50_ms']} ms", f"p99 {fig['search_call_p99_ms']} ms"),
            ("faiss flat IP", f"p50 {fig['faiss_p50_ms']} ms", f"p99 {fig['faiss_p99_ms']} ms"),
            ("numpy matmul", f"p50 {fig['numpy_p50_ms']} ms", f"p99 {fig['numpy_p99_ms']} ms"),
            ("  (cpu)", f"faiss {fig['faiss_cpu_p50_ms']} ms", f"numpy {fig['numpy_cpu_p50_ms']} ms")]
    for r in rows:
        sys.stderr.write(f"{r[0]:<15} {r[1]:>18} {r[2]:>22}\n")


if __name__ == "__main__":
    main()
