"""Embedding models for dense text retrieval and CLIP-style image search (local paths only).

`load_embedder(path)` gives an object with `name` and `encode(items, kind=...)` returning
L2-normalized float32 rows: a sentence-transformers model when that package is installed,
else (text only) a transformers encoder pooled the way the model's own sentence-transformers
config says (mean by default, CLS when configured). Tests inject their own small embedders
with the same two members.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mars_cli.errors import MarsError


def load_embedder(path: str | os.PathLike, *, images: bool = False):
    """An embedding model from a local path: sentence-transformers when installed, else
    (text only) a plain transformers encoder with the pooling the model's config names."""
    if not Path(path).exists():
        raise MarsError(f"{path}: no such model directory (models are loaded from local paths only)")
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        if images or not (Path(path) / "config.json").exists():
            what = "CLIP image embeddings" if images else f"{path} (no transformers config.json)"
            raise MarsError(f"{what}: needs the sentence-transformers package (pip install sentence-transformers)") from None
        return PooledEmbedder(path)
    return SentenceEmbedder(path)


def _prefixes(name: str, prompts: dict) -> dict:
    # E5-style models were trained with these prefixes; configured prompts win.
    e5 = "e5" in name.lower()
    return {"query": prompts.get("query", "query: " if e5 else ""),
            "passage": prompts.get("passage", prompts.get("document", "passage: " if e5 else ""))}


class PooledEmbedder:
    """transformers AutoModel + the pooling its sentence-transformers config names (mean by default)."""

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 32, max_length: int = 512):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.name = Path(path).name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModel.from_pretrained(str(path)).eval()
        except (OSError, ValueError) as e:
            raise MarsError(f"{path}: cannot load the embedding model: {e}") from None
        pooling = Path(path) / "1_Pooling" / "config.json"
        cfg = json.loads(pooling.read_text()) if pooling.exists() else {}
        self.cls = bool(cfg.get("pooling_mode_cls_token")) and not cfg.get("pooling_mode_mean_tokens")
        prompts_file = Path(path) / "config_sentence_transformers.json"
        prompts = json.loads(prompts_file.read_text()).get("prompts", {}) if prompts_file.exists() else {}
        self.prefix = _prefixes(self.name, prompts or {})
        self.batch_size, self.max_length = batch_size, max_length

    def encode(self, items: list, *, kind: str = "passage") -> np.ndarray:
        if items and not isinstance(items[0], str):
            raise MarsError("image embeddings (CLIP) need the sentence-transformers package (pip install sentence-transformers)")
        torch, out = self.torch, []
        texts = [self.prefix.get(kind, "") + t for t in items]
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[s : s + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                if self.cls:
                    vec = hidden[:, 0]
                else:
                    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
                out.append(torch.nn.functional.normalize(vec.float(), dim=-1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


class SentenceEmbedder:
    """A local sentence-transformers model (text, or CLIP-style images and text).

    E5-style models want "query: " / "passage: " prefixes; the model's own configured
    prompts win, else an "e5" in the model's name turns the prefixes on.
    """

    def __init__(self, path: str):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MarsError("dense/CLIP embeddings need the sentence-transformers package (pip install sentence-transformers)") from None
        if not Path(path).exists():
            raise MarsError(f"{path}: no such model directory (models are loaded from local paths only)")
        self.model = SentenceTransformer(path, device="cpu")
        self.name = Path(path).name
        self.prefix = _prefixes(self.name, getattr(self.model, "prompts", None) or {})

    def encode(self, items: list, *, kind: str = "passage") -> np.ndarray:
        if items and isinstance(items[0], str):
            items = [self.prefix.get(kind, "") + t for t in items]
        return np.asarray(self.model.encode(items, convert_to_numpy=True, normalize_embeddings=True), dtype=np.float32)
