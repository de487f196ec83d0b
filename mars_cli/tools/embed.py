"""Embedding models for dense text retrieval and CLIP-style image search (local paths only).

`load_embedder(path)` gives an object with `name`, `path` and `encode(items, kind=...)`
returning L2-normalized float32 rows: a sentence-transformers model when that package is
installed, else (text only) `PooledEmbedder`, a transformers encoder that reproduces what
sentence-transformers computes for the model:
- the model's `max_seq_length` (sentence_bert_config.json; 256 for all-MiniLM-L6-v2),
  not the tokenizer's 512, and its `do_lower_case`;
- the pooling its 1_Pooling/config.json names (mean, CLS, max, mean-sqrt-len);
- L2 normalisation (what the index's inner product needs, and what a Normalize module does);
- the prompts of config_sentence_transformers.json, else E5's "query: "/"passage: "
  prefixes when the model's name says e5.
Texts are tokenized once, sorted by length and batched so that a batch pads to about its
own longest text: padding is the wasted work of unsorted batches (about 2x on passages).

Loaded models are kept per process (keyed by path), so every toolbox, search and server
of one process shares one model, and repeated queries hit a small cache of vectors.
Tests inject their own small embedders with the same members.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from mars_cli.errors import MarsError

_LOADED: dict[tuple, object] = {}
_LOCK = threading.Lock()


def load_embedder(path: str | os.PathLike, *, images: bool = False):
    """An embedding model from a local path (shared per process): sentence-transformers when
    installed, else (text only) a transformers encoder with the model's own settings."""
    if not Path(path).exists():
        raise MarsError(f"{path}: no such model directory (models are loaded from local paths only)")
    key = (str(Path(path).resolve()), images)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            if images or not (Path(path) / "config.json").exists():
                what = "CLIP image embeddings" if images else f"{path} (no transformers config.json)"
                raise MarsError(f"{what}: needs the sentence-transformers package (pip install sentence-transformers)") from None
            emb = PooledEmbedder(path)
        else:
            emb = SentenceEmbedder(path)
        _LOADED[key] = emb
        return emb


def _prefixes(name: str, prompts: dict) -> dict:
    # E5-style models were trained with these prefixes; configured prompts win.
    e5 = "e5" in name.lower()
    return {"query": prompts.get("query", "query: " if e5 else ""),
            "passage": prompts.get("passage", prompts.get("document", "passage: " if e5 else ""))}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise MarsError(f"{path}: cannot read: {e}") from None
    return data if isinstance(data, dict) else {}


def model_settings(path: str | os.PathLike) -> dict:
    """What sentence-transformers would use: max_seq_length, do_lower_case, pooling, normalize, prompts."""
    path = Path(path)
    st = _json(path / "sentence_bert_config.json")
    modules = []
    if (path / "modules.json").is_file():
        try:
            modules = json.loads((path / "modules.json").read_text())
        except json.JSONDecodeError as e:
            raise MarsError(f"{path / 'modules.json'}: cannot read: {e}") from None
    pool_dir = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), "1_Pooling")
    pool = _json(path / (pool_dir or "1_Pooling") / "config.json")
    mode = "mean"
    if pool.get("pooling_mode_cls_token") and not pool.get("pooling_mode_mean_tokens"):
        mode = "cls"
    elif pool.get("pooling_mode_max_tokens") and not pool.get("pooling_mode_mean_tokens"):
        mode = "max"
    elif pool.get("pooling_mode_mean_sqrt_len_tokens"):
        mode = "mean_sqrt_len"
    cfg = _json(path / "config.json")
    max_len = st.get("max_seq_length")
    if not isinstance(max_len, int) or max_len <= 0:
        tok_cfg = _json(path / "tokenizer_config.json")
        limits = [v for v in (tok_cfg.get("model_max_length"), cfg.get("max_position_embeddings"))
                  if isinstance(v, int) and 0 < v < 1_000_000]
        max_len = min(limits) if limits else 512
    prompts = _json(path / "config_sentence_transformers.json").get("prompts") or {}
    return {"max_seq_length": int(max_len), "do_lower_case": bool(st.get("do_lower_case", False)), "pooling": mode,
            "normalize": True, "prompts": prompts if isinstance(prompts, dict) else {}}


class _QueryCache:
    """The last few thousand query vectors: a group's samples often search the same words."""

    def __init__(self, size: int = 4096):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            v = self.data.get(key)
            if v is not None:
                self.data.move_to_end(key)
            return v

    def put(self, key, v) -> None:
        with self.lock:
            self.data[key] = v
            if len(self.data) > self.size:
                self.data.popitem(last=False)


class PooledEmbedder:
    """transformers AutoModel + the model's sentence-transformers settings, length-sorted batches."""

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 32, max_length: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from mars_cli.models.load import quiet_transformers

        quiet_transformers()
        self.torch = torch
        self.path = str(Path(path).resolve())
        self.name = Path(path).name
        self.settings = model_settings(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise MarsError(f"{path}: cannot load the embedding model: {e}") from None
        self.cls = self.settings["pooling"] == "cls"
        self.prefix = _prefixes(self.name, self.settings["prompts"])
        self.batch_size = batch_size
        self.max_length = int(max_length or self.settings["max_seq_length"])
        self._lock = threading.Lock()  # one forward at a time: torch already uses every core
        self._queries = _QueryCache()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if self.settings["do_lower_case"]:
            texts = [t.lower() for t in texts]
        return self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)["input_ids"]

    def _pool(self, hidden, mask):
        torch = self.torch
        mode = self.settings["pooling"]
        if mode == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if mode == "max":
            return hidden.masked_fill(m == 0, -1e9).max(1).values
        summed, n = (hidden * m).sum(1), m.sum(1).clamp(min=1.0)
        return summed / (torch.sqrt(n) if mode == "mean_sqrt_len" else n)

    reports_progress = True  # encode(..., on_progress=callable(n_done_in_batch))

    def encode_ids(self, ids: list[list[int]], on_progress=None) -> np.ndarray:
        """Embeddings of tokenized texts, batched longest first; rows in the input order."""
        torch = self.torch
        dim = self.model.config.hidden_size
        out = np.zeros((len(ids), dim), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        pad = self.tokenizer.pad_token_id or 0
        # One short query is too small to split across threads: on a busy machine the
        # thread team costs more than it saves (measured 88 → 16 ms p50 on 2 loaded cores).
        # OpenMP's thread count is per calling thread, so this touches no other work.
        threads = torch.get_num_threads()
        single = len(ids) == 1 and threads > 1
        with self._lock, torch.inference_mode():
            if single:
                torch.set_num_threads(1)
            for s in range(0, len(order), self.batch_size):
                rows = order[s : s + self.batch_size]
                width = max(len(ids[i]) for i in rows)
                inp = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, i in enumerate(rows):
                    inp[j, : len(ids[i])] = torch.tensor(ids[i])
                    mask[j, : len(ids[i])] = 1
                kwargs = {"input_ids": inp, "attention_mask": mask}
                if "token_type_ids" in self.tokenizer.model_input_names:
                    kwargs["token_type_ids"] = torch.zeros_like(inp)
                hidden = self.model(**kwargs).last_hidden_state
                vec = torch.nn.functional.normalize(self._pool(hidden, mask).float(), dim=-1)
                out[rows] = vec.numpy()
                if on_progress is not None:
                    on_progress(len(rows))
            if single:
                torch.set_num_threads(threads)
        return out

    def encode(self, items: list, *, kind: str = "passage", on_progress=None) -> np.ndarray:
        if items and not isinstance(items[0], str):
            raise MarsError("image embeddings (CLIP) need the sentence-transformers package (pip install sentence-transformers)")
        texts = [self.prefix.get(kind, "") + t for t in items]
        if kind == "query" and len(texts) == 1:
            hit = self._queries.get(texts[0])
            if hit is None:
                hit = self.encode_ids(self.tokenize(texts))[0]
                self._queries.put(texts[0], hit)
            return hit[None, :].copy()
        return self.encode_ids(self.tokenize(texts), on_progress)

    def describe(self) -> dict:
        """What the index records about the model."""
        return {"model": self.name, "path": self.path, "max_seq_length": self.max_length,
                "pooling": self.settings["pooling"], "prefix": dict(self.prefix), "encoder": "transformers"}


class SentenceEmbedder:
    """A local sentence-transformers model (text, or CLIP-style images and text).

    E5-style models want "query: " / "passage: " prefixes; the model's own configured
    prompts win, else an "e5" in the model's name turns the prefixes on.
    """

    def __init__(self, path: str | os.PathLike):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MarsError("dense/CLIP embeddings need the sentence-transformers package (pip install sentence-transformers)") from None
        if not Path(path).exists():
            raise MarsError(f"{path}: no such model directory (models are loaded from local paths only)")
        self.model = SentenceTransformer(str(path), device="cpu")
        self.path = str(Path(path).resolve())
        self.name = Path(path).name
        self.prefix = _prefixes(self.name, getattr(self.model, "prompts", None) or {})
        self._queries = _QueryCache()

    def encode(self, items: list, *, kind: str = "passage") -> np.ndarray:
        if items and isinstance(items[0], str):
            items = [self.prefix.get(kind, "") + t for t in items]
            if kind == "query" and len(items) == 1 and (hit := self._queries.get(items[0])) is not None:
                return hit[None, :].copy()
        vecs = np.asarray(self.model.encode(items, convert_to_numpy=True, normalize_embeddings=True), dtype=np.float32)
        if kind == "query" and len(items) == 1 and isinstance(items[0], str):
            self._queries.put(items[0], vecs[0])
        return vecs

    def describe(self) -> dict:
        return {"model": self.name, "path": self.path, "max_seq_length": getattr(self.model, "max_seq_length", None),
                "prefix": dict(self.prefix), "encoder": "sentence-transformers"}
