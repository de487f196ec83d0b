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
    assert m["method"] == "bm25+dense" and m["dense"] == {"model": "tiny-e5-encoder", "dim": 32, "faiss": "IndexFlatIP"}
    for method in ("dense", "hybrid"):
        r = runner.invoke(app, ["search", "--index", str(tmp_path / "idx"), "--dense-model", str(tiny_encoder), "--method", method, "-k", "3", "everest mountain"])
        assert r.exit_code == 0, r.stderr
        got = [json.loads(x)["doc_id"] for x in r.stdout.splitlines()]
        assert sorted(got) == ["a", "b", "c"]  # dense ranks every passage; random weights say nothing about order
    # an exact-match query: the passage's own embedding (with the passage prefix) is its nearest neighbour
    from mars_cli.tools.index_text import TextIndex

    emb = load_embedder(tiny_encoder)
    ix = TextIndex(tmp_path / "idx", embedder=emb)
    emb.prefix["query"] = emb.prefix["passage"]
    assert ix.dense_top("Everest\neverest mountain nepal", 1)[0][0] == 1
