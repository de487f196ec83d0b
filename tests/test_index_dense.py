"""Dense retrieval through a real (tiny, random) transformers encoder and faiss, via the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mars_cli.errors import MarsError
from mars_cli.main import app
from mars_cli.tools.embed import PooledEmbedder, load_embedder

pytestmark = pytest.mark.slow  # imports torch and transformers (~15 s on 2 cores)

WORDS = "eiffel tower paris iron everest mountain nepal penicillin fleming mould river amazon water".split()


def _has_sentence_transformers() -> bool:
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A 2-layer BERT with random weights and a word-level vocab, saved like a hub model."""
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("models") / "tiny-e5-encoder"
    d.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "query", "passage", ":", "\n"] + WORDS
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert tok.unk_token_id not in tok("query: eiffel tower")["input_ids"]  # the vocab really is ours
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_pooled_embedder_is_normalized_deterministic_and_prefixed(tiny_encoder):
    if _has_sentence_transformers():
        pytest.skip("sentence-transformers is installed: load_embedder uses it")
    emb = load_embedder(tiny_encoder)
    assert isinstance(emb, PooledEmbedder) and emb.prefix == {"query": "query: ", "passage": "passage: "}  # "e5" in the name
    a = emb.encode(["eiffel tower paris", "river amazon water"], kind="passage")
    b = emb.encode(["eiffel tower paris"], kind="passage")
    assert a.shape == (2, 32) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # padding does not leak into the mean
    assert not np.allclose(emb.encode(["eiffel tower paris"], kind="query")[0], b[0])  # the prefix changes the input
    with pytest.raises(MarsError, match="sentence-transformers"):
        emb.encode([object()])
    with pytest.raises(MarsError, match="sentence-transformers"):
        load_embedder(tiny_encoder, images=True)
    with pytest.raises(MarsError, match="no such model directory"):
        load_embedder(tiny_encoder / "nope")


def test_cli_dense_index_and_hybrid_search(tiny_encoder, tmp_path):
    if _has_sentence_transformers():
        pytest.skip("sentence-transformers is installed: load_embedder uses it")
    corpus = tmp_path / "c.jsonl"
    rows = [{"id": "a", "title": "Eiffel", "text": "eiffel tower paris iron"},
            {"id": "b", "title": "Everest", "text": "everest mountain nepal"},
            {"id": "c", "title": "Amazon", "text": "river amazon water"}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    r = runner.invoke(app, ["index", "text", str(corpus), "--out", str(tmp_path / "idx"), "--dense-model", str(tiny_encoder)])
    assert r.exit_code == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["method"] == "bm25+dense"
    assert m["dense"] == {"model": "tiny-e5-encoder", "path": str(tiny_encoder.resolve()), "max_seq_length": 64, "pooling": "mean",
                          "prefix": {"query": "query: ", "passage": "passage: "}, "encoder": "transformers",
                          "dim": 32, "faiss": "IndexFlatIP"}
    for method in ("dense", "hybrid"):
        r = runner.invoke(app, ["search", "--index", str(tmp_path / "idx"), "--dense-model", str(tiny_encoder), "--method", method, "-k", "3", "everest mountain"])
        assert r.exit_code == 0, r.stderr
        got = [json.loads(x)["doc_id"] for x in r.stdout.splitlines()]
        assert sorted(got) == ["a", "b", "c"]  # dense ranks every passage; random weights say nothing about order
    # an exact-match query: the passage's own embedding (with the passage prefix) is its nearest neighbour
    from mars_cli.tools.index_text import TextIndex

    emb = PooledEmbedder(tiny_encoder)  # its own instance: load_embedder's is shared by the process
    ix = TextIndex(tmp_path / "idx", embedder=emb)
    emb.prefix["query"] = emb.prefix["passage"]
    assert ix.dense_top("Everest\neverest mountain nepal", 1)[0][0] == 1


def _reference(model_dir, texts: list[str], max_len: int) -> np.ndarray:
    """sentence-transformers' computation, one text at a time: no padding, no batching."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    rows = []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, truncation=True, max_length=max_len, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            v = h.mean(0)
            rows.append((v / v.norm()).numpy())
    return np.stack(rows)


def test_sorted_batches_match_the_one_at_a_time_reference_and_max_seq_length(tiny_encoder, tmp_path):
    import shutil

    d = tmp_path / "enc"
    shutil.copytree(tiny_encoder, d)
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    emb = PooledEmbedder(d, batch_size=3)
    assert emb.max_length == 12  # the model's max_seq_length, not the tokenizer's limit
    texts = [" ".join(WORDS[: n % len(WORDS) + 1]) for n in (0, 9, 3, 14, 1, 6, 11, 2)] + [" ".join(WORDS * 3)]
    got = emb.encode(texts, kind="none")
    ref = _reference(d, texts, 12)
    np.testing.assert_allclose((got * ref).sum(1), 1.0, atol=1e-5)  # cosine 1 row by row: order restored
    long_ids = emb.tokenize([" ".join(WORDS * 3)])[0]
    assert len(long_ids) == 12  # truncated at max_seq_length
    assert not np.allclose(got[-1], _reference(d, [" ".join(WORDS * 3)], 64)[0], atol=1e-3)  # 64 would differ


def _corpus(tmp_path):
    corpus = tmp_path / "c.jsonl"
    rows = [{"id": "a", "title": "Eiffel", "text": "eiffel tower paris iron"},
            {"id": "b", "title": "Everest", "text": "everest mountain nepal"},
            {"id": "c", "title": "Amazon", "text": "river amazon water"}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corpus


def test_a_dense_index_searches_hybrid_with_the_model_it_records(tiny_encoder, tmp_path):
    import shutil

    model = tmp_path / "e5-model"
    shutil.copytree(tiny_encoder, model)
    runner = CliRunner()
    r = runner.invoke(app, ["index", "text", str(_corpus(tmp_path)), "--out", str(tmp_path / "idx"), "--dense-model", str(model)])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["dense"]["path"] == str(model.resolve())
    q = ["search", "--index", str(tmp_path / "idx"), "-k", "3", "everest mountain"]
    implicit = runner.invoke(app, q)
    explicit = runner.invoke(app, q + ["--method", "hybrid", "--dense-model", str(model)])
    bm25 = runner.invoke(app, q + ["--method", "bm25"])
    assert implicit.exit_code == explicit.exit_code == bm25.exit_code == 0, implicit.stderr
    assert implicit.stdout == explicit.stdout and implicit.stdout != bm25.stdout  # hybrid, not a quiet BM25
    shutil.move(model, tmp_path / "moved-e5-model")
    gone = runner.invoke(app, q, standalone_mode=False)
    assert gone.exception is not None and f"its embedding model {model.resolve()} does not exist" in str(gone.exception)
    assert gone.stdout == ""
    assert runner.invoke(app, q + ["--method", "bm25"]).stdout == bm25.stdout
    moved = runner.invoke(app, q + ["--dense-model", str(tmp_path / "moved-e5-model")])
    assert moved.exit_code == 0 and moved.stdout == implicit.stdout


def test_queries_are_embedded_once(tiny_encoder, tmp_path, monkeypatch):
    emb = PooledEmbedder(tiny_encoder)
    calls = []
    real = emb.encode_ids
    monkeypatch.setattr(emb, "encode_ids", lambda ids: calls.append(len(ids)) or real(ids))
    a = emb.encode(["everest mountain"], kind="query")
    b = emb.encode(["everest mountain"], kind="query")
    np.testing.assert_array_equal(a, b)
    assert calls == [1]


def test_retriever_server_speaks_search_r1_and_mars_reads_it(tiny_encoder, tmp_path):
    import httpx

    from mars_cli.tools.index_text import TextIndex, build_text_index, parse_passage
    from mars_cli.tools.retriever_server import RetrieverServer
    from mars_cli.tools.text_search import open_text_search

    rows = [json.loads(x) for x in _corpus(tmp_path).read_text().splitlines()]
    build_text_index([parse_passage(r, None) for r in rows], tmp_path / "idx", embedder=load_embedder(tiny_encoder))
    ix = TextIndex(tmp_path / "idx")
    server = RetrieverServer(ix, port=0)
    server.start()
    try:
        assert server.server_address[0] == "127.0.0.1" and server.method == "hybrid"
        r = httpx.post(f"{server.url}/retrieve", json={"queries": ["everest mountain", "river water"], "topk": 2, "return_scores": True})
        assert r.status_code == 200
        res = r.json()["result"]
        assert len(res) == 2 and len(res[0]) == 2
        assert res[0][0]["document"] == {"id": "b", "title": "Everest", "text": "everest mountain nepal", "contents": '"Everest"\neverest mountain nepal'}
        assert isinstance(res[0][0]["score"], float)
        plain = httpx.post(f"{server.url}/retrieve", json={"queries": ["everest mountain"], "topk": 1}).json()["result"]
        assert plain == [[{"id": "b", "title": "Everest", "text": "everest mountain nepal", "contents": '"Everest"\neverest mountain nepal'}]]
        assert httpx.post(f"{server.url}/retrieve", json={"queries": "x"}).status_code == 400
        assert httpx.post(f"{server.url}/retrieve", content=b"{").status_code == 400
        assert httpx.get(f"{server.url}/health").json()["passages"] == 3
        ts = open_text_search("retriever", retriever_url=server.url)  # mars's own client for the protocol
        got = ts.search("everest mountain", k=2)
        assert got[0]["title"] == "Everest" and got[0]["doc_id"] == "b" and got[0]["text"] == "everest mountain nepal"
    finally:
        server.shutdown()
        server.server_close()
