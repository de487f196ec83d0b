"""The local text index: parsing, BM25 against bm25s itself, retrieval, dense fusion."""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest

from mars_cli.errors import MarsError, RecordError, ToolError
from mars_cli.jsonl import Where
from mars_cli.tools.index_text import Analyzer, TextIndex, build_text_index, parse_passage
from mars_cli.tools.text_search import open_text_search, render_text_results

CORPUS = [
    ("eiffel", "Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was designed by Gustave Eiffel's company and completed in 1889 as the entrance to the World's Fair."),
    ("everest", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal range of the Himalayas on the border of Nepal and China."),
    ("penicillin", "Penicillin", "Alexander Fleming discovered penicillin in 1928 when he noticed that mould killed bacteria in a culture dish at St Mary's Hospital in London."),
    ("mona", "Mona Lisa", "The Mona Lisa is a half-length portrait painting by the Italian artist Leonardo da Vinci, displayed at the Louvre museum in Paris."),
    ("amazon", "Amazon River", "The Amazon River in South America is the largest river by discharge volume of water in the world, flowing through Brazil, Peru and Colombia."),
    ("apollo", "Apollo 11", "Apollo 11 was the spaceflight that first landed humans on the Moon; Neil Armstrong and Buzz Aldrin walked on the lunar surface in July 1969."),
    ("car", "Ford Model T", "The Ford Model T car was produced by Ford Motor Company from 1908 and made motoring affordable for middle-class Americans."),
    ("python", "Python language", "Python is a high-level programming language created by Guido van Rossum and first released in 1991; it emphasises code readability."),
]

PARAPHRASES = [
    ("which company's lattice towers were finished for the 1889 fair", "eiffel"),
    ("tallest mountains on earth near nepal", "everest"),
    ("who discovered that moulds kill bacterium", "penicillin"),
    ("portrait painted by leonardo hanging in the louvre", "mona"),
    ("biggest rivers by water discharge", "amazon"),
    ("first humans landing on the moon", "apollo"),
    ("programming languages released by guido", "python"),
]


def corpus_rows(fmt="title"):
    for pid, title, text in CORPUS:
        if fmt == "flashrag":
            yield {"id": pid, "contents": f'"{title}"\n{text}'}
        else:
            yield {"id": pid, "title": title, "text": text, "url": f"https://example.org/{pid}"}


def parsed(fmt="title"):
    return (parse_passage(r, Where("c.jsonl", i)) for i, r in enumerate(corpus_rows(fmt), 1))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "wiki"
    build_text_index(parsed("flashrag"), out, chunk=3)
    return out


def test_parse_formats():
    w = Where("c.jsonl", 4)
    assert parse_passage({"id": 1, "contents": '"T"\nbody'}, w) == {"id": "1", "title": "T", "text": "body"}
    assert parse_passage({"id": "x", "title": "T", "text": "b", "url": "u"}, w) == {"id": "x", "title": "T", "text": "b", "url": "u"}
    assert parse_passage({"contents": "no title line"}, w) == {"id": "4", "title": "", "text": "no title line"}
    with pytest.raises(RecordError, match=r"c.jsonl:4: a passage needs 'contents' or 'text'"):
        parse_passage({"id": 1, "body": "x"}, w)


@pytest.mark.parametrize("question,expected", PARAPHRASES)
def test_paraphrased_queries_rank_the_right_passage_first(index_dir, question, expected):
    res = open_text_search("local", index=str(index_dir)).search(question, k=3)
    assert res[0]["doc_id"] == expected, res


def test_scores_match_bm25s_reference(index_dir):
    import bm25s

    an = Analyzer()
    ref = bm25s.BM25()  # lucene variant, k1=1.5, b=0.75: the same as ours
    ref.index([an(f"{t} {x}") for _, t, x in CORPUS], show_progress=False)
    ix = TextIndex(index_dir)
    for q in ["paris tower", "moon humans 1969", "river water world", "fleming"]:
        toks = an(q)
        ours = ix.bm25.get_scores_from_ids([ix.vocab[t] for t in toks if t in ix.vocab])
        theirs = ref.get_scores([t for t in toks if t in ref.vocab_dict])
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_the_index(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ma = build_text_index(parsed(), a, chunk=1)
    mb = build_text_index(parsed(), b, chunk=1000)
    assert ma["passages_sha256"] == mb["passages_sha256"] and ma["vocab"] == mb["vocab"] and ma["tokens"] == mb["tokens"]
    ia, ib = TextIndex(a), TextIndex(b)
    assert ia.vocab.keys() == ib.vocab.keys()
    for term in ia.vocab:  # term ids may be numbered differently; every term's scores agree
        np.testing.assert_allclose(ia.bm25.get_scores_from_ids([ia.vocab[term]]), ib.bm25.get_scores_from_ids([ib.vocab[term]]), rtol=1e-6)


def test_round_trip_manifest_and_passages(tmp_path):
    m = build_text_index(parsed(), tmp_path / "i", source="c.jsonl")
    on_disk = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert on_disk == m and m["passages"] == len(CORPUS) and m["method"] == "bm25" and m["dense"] is None
    ix = TextIndex(tmp_path / "i")
    assert [ix.passage(i)["id"] for i in range(ix.n)] == [c[0] for c in CORPUS]
    assert ix.passage(3) == {"id": "mona", "title": "Mona Lisa", "text": CORPUS[3][2], "url": "https://example.org/mona"}
    assert not list(tmp_path.glob(".i.tmp-*"))  # the temporary dir was renamed away


def test_failed_build_leaves_previous_index(tmp_path):
    out = tmp_path / "i"
    build_text_index(parsed(), out)
    before = (out / "manifest.json").read_text()

    def bad():
        yield from parsed()
        raise RecordError("c.jsonl", 9, "boom")

    with pytest.raises(RecordError):
        build_text_index(bad(), out)
    assert (out / "manifest.json").read_text() == before


def test_oov_query_is_no_results_tool_error(index_dir):
    ts = open_text_search("local", index=str(index_dir))
    with pytest.raises(ToolError, match="no results"):
        ts.search("zzzqqq xyzzy")
    with pytest.raises(ToolError, match="non-empty"):
        ts.search("   ")


def test_missing_index_is_clear(tmp_path):
    with pytest.raises(MarsError, match="not a text index"):
        open_text_search("local", index=str(tmp_path))
    with pytest.raises(MarsError, match="needs an index"):
        open_text_search("local")


class SynonymHashEmbedder:
    """Deterministic stand-in for a dense model: hashed word features, with a few synonyms
    folded together so dense retrieval can find what BM25 cannot."""

    name = "synonym-hash-64"
    SYN = {"automobile": "car", "vehicle": "car", "autos": "car", "coder": "programming"}

    def encode(self, texts, *, kind="passage"):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                w = self.SYN.get(w, w)
                h = zlib.crc32(w.encode())
                out[i, h % 64] += 1.0 if (h >> 8) & 1 else -1.0
        return out


def test_dense_and_hybrid_fusion(tmp_path):
    emb = SynonymHashEmbedder()
    m = build_text_index(parsed(), tmp_path / "d", embedder=emb)
    assert m["method"] == "bm25+dense" and m["dense"] == {"model": "synonym-hash-64", "dim": 64, "faiss": "IndexFlatIP"}
    ts = open_text_search("local", index=str(tmp_path / "d"), embedder=emb)
    # "automobile" is not in the corpus: BM25 alone finds nothing, dense folds it into "car".
    with pytest.raises(ToolError):
        open_text_search("local", index=str(tmp_path / "d"), embedder=emb, method="bm25").search("automobile")
    assert ts.search("automobile produced 1908", k=3)[0]["doc_id"] == "car"
    ix = TextIndex(tmp_path / "d", embedder=emb)
    fused = ix.search("automobile produced 1908", 3, method="hybrid", fusion="rrf")
    bm, de = dict(ix.bm25_top("automobile produced 1908", 50)), dict(ix.dense_top("automobile produced 1908", 50))
    car = 6
    assert car in bm and car in de  # "produced"/"1908" match lexically too
    # RRF: 1/(60 + rank) summed over both lists
    rb = sorted(bm, key=lambda i: -bm[i]).index(car) + 1
    rd = sorted(de, key=lambda i: -de[i]).index(car) + 1
    assert dict(fused)[car] == pytest.approx(1 / (60 + rb) + 1 / (60 + rd))
    # the default, relative-score fusion: each list min-max scaled, 0.75 dense + 0.25 bm25
    rel = dict(ix.search("automobile produced 1908", 50, method="hybrid"))

    def scaled(d, i):
        if i not in d:
            return 0.0
        lo, hi = min(d.values()), max(d.values())
        return (d[i] - lo) / (hi - lo) if hi > lo else 1.0

    for i in set(bm) | set(de):
        assert rel[i] == pytest.approx(0.75 * scaled(de, i) + 0.25 * scaled(bm, i))


def test_dense_without_package_names_it(tmp_path):
    pytest.importorskip("faiss")
    try:
        import sentence_transformers  # noqa: F401
        pytest.skip("sentence-transformers is installed here")
    except ImportError:
        pass
    build_text_index(parsed(), tmp_path / "i")
    with pytest.raises(MarsError, match="sentence-transformers"):
        open_text_search("local", index=str(tmp_path / "i"), dense_model=str(tmp_path))


def test_render_budget_and_layout():
    results = [{"rank": i, "title": f"Title {i}", "text": "word " * 500, "doc_id": str(i), "score": 1.0, "backend": "local"} for i in range(1, 6)]
    for budget in (100, 500, 3000):
        out = render_text_results("a query", results, budget_chars=budget)
        assert len(out) <= budget
    out = render_text_results("a query", results[:2], budget_chars=600)
    assert out.splitlines()[0] == 'Search results for "a query":'
    assert out.splitlines()[1] == "[1] Title 1 (doc 1)" and out.count("…") == 2
    short = [{"rank": 1, "title": "T", "text": "short text", "url": "https://x.org", "score": 1.0, "backend": "serper"}]
    assert render_text_results("q", short) == 'Search results for "q":\n[1] T (https://x.org)\nshort text'
    assert render_text_results("q", []) == 'Search results for "q":\nNo results.'


def test_threads_share_one_search(index_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    ts = open_text_search("local", index=str(index_dir), cache=str(tmp_path / "c"))
    qs = [q for q, _ in PARAPHRASES] * 6
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: ts.search(q, k=1)[0]["doc_id"], qs))
    assert got == [e for _, e in PARAPHRASES] * 6 and len(ts.cache) == len(PARAPHRASES)


def test_top_k_selection_against_a_full_sort():
    from mars_cli.tools.index_text import _top

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        scores = rng.choice([0.0, 0.5, 1.0, 1.5, 2.0], size=n).astype(np.float32)  # many ties and zeros
        k = int(rng.integers(1, 12))
        expected = sorted(((i, float(s)) for i, s in enumerate(scores) if s > 0), key=lambda x: (-x[1], x[0]))[:k]
        assert _top(scores, k) == expected


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_result = st.fixed_dictionaries(
    {"rank": st.integers(1, 50), "title": st.text(max_size=300), "text": st.text(max_size=2000), "score": st.floats(0, 100),
     "backend": st.just("local")},
    optional={"url": st.text(max_size=200), "doc_id": st.text(max_size=20), "summary": st.text(max_size=500),
              "query_summary": st.text(max_size=800)},
)


@settings(max_examples=150, deadline=None)
@given(query=st.text(max_size=300), results=st.lists(_result, max_size=8), budget=st.integers(1, 4000))
def test_render_never_exceeds_budget(query, results, budget):
    out = render_text_results(query, results, budget_chars=budget)
    assert len(out) <= budget
    head = out.split("\n", 1)[0]
    if budget >= 250 + len(query):
        assert head.startswith('Search results for "')


def test_method_checked_when_opening(index_dir):
    with pytest.raises(MarsError, match="unknown retrieval method 'fuzzy'"):
        open_text_search("local", index=str(index_dir), method="fuzzy")
    with pytest.raises(MarsError, match="--method dense needs an index built with --dense-model"):
        open_text_search("local", index=str(index_dir), method="dense")
