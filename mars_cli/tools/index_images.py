"""The local image index: titles, thumbnails and one descriptor per image.

Descriptors: a local CLIP-style model's embedding when one is given (searched with a
faiss inner-product index), otherwise a weight-free one named "phash64+lab8x8": a
64-bit DCT perceptual hash (structure, robust to rescaling and recompression) and the
mean CIE-Lab colour of an 8×8 grid (colour layout). The weight-free descriptor finds
near-duplicates, resized or re-encoded copies of an indexed image; it does not know
what an image shows, and the manifest says which descriptor was used.

Layout: manifest.json, items.jsonl ({title, thumbnail, source, sha256}), thumbs/*.jpg,
phash.npy + lab.npy (weight-free) or clip.faiss (model).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson

from mars_cli import __version__, streams
from mars_cli.errors import MarsError
from mars_cli.fsutil import atomic_dir, read_manifest, sha256_file

FORMAT = "mars-image-index"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WEIGHT_FREE = "phash64+lab8x8"


def _load(path) -> "PIL.Image.Image":  # noqa: F821
    from mars_cli.images import load_image

    return load_image(path)


def collect_images(source: str | os.PathLike) -> Iterator[dict]:
    """{path, title} for a folder (titles from titles.jsonl/titles.tsv) or a JSONL of {image, title}."""
    source = Path(source)
    if source.is_dir():
        titles = _sidecar_titles(source)
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTS and "thumbs" not in p.parts)
        if not files:
            raise MarsError(f"{source}: no images found ({', '.join(IMAGE_EXTS)})")
        for p in files:
            rel = p.relative_to(source).as_posix()
            yield {"path": p, "title": titles.get(rel) or titles.get(p.name) or p.stem.replace("_", " ")}
        return
    from mars_cli.jsonl import read_located

    for where, rec in read_located([source]):
        img = rec.get("image", rec.get("path"))
        if not isinstance(img, str):
            raise where.error("an image record needs a string field 'image' (a path)")
        p = Path(img) if Path(img).is_absolute() else source.parent / img
        title = rec.get("title")
        if title is not None and not isinstance(title, str):
            raise where.error("field 'title' must be a string")
        yield {"path": p, "title": title or p.stem.replace("_", " ")}


def _sidecar_titles(folder: Path) -> dict[str, str]:
    titles: dict[str, str] = {}
    jl, tsv = folder / "titles.jsonl", folder / "titles.tsv"
    if jl.exists():
        from mars_cli.jsonl import read_located

        for where, rec in read_located([jl]):
            name, title = rec.get("file", rec.get("image")), rec.get("title")
            if not isinstance(name, str) or not isinstance(title, str):
                raise where.error("a titles record needs string fields 'file' and 'title'")
            titles[name] = title
    elif tsv.exists():
        with open(tsv, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                if len(row) < 2:
                    raise MarsError(f"{tsv}:{n}: expected 'file<TAB>title'")
                titles[row[0]] = row[1]
    return titles


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)


def phash(img) -> np.ndarray:
    """64 bits: the low 8×8 DCT frequencies of a 32×32 grey image above their median."""
    from PIL import Image

    g = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ g @ _DCT32.T)[:8, :8].ravel()
    return (low > np.median(low[1:])).astype(np.uint8)  # the DC term would dominate the median


def lab_grid(img) -> np.ndarray:
    """Mean CIE-Lab (D65) colour of an 8×8 grid of cells, flattened to 192 floats."""
    from PIL import Image

    rgb = np.asarray(img.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float64) / 255.0
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    lab = np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)
    return lab.reshape(-1).astype(np.float32)


def similarity(q_hash: np.ndarray, q_lab: np.ndarray, hashes: np.ndarray, labs: np.ndarray) -> np.ndarray:
    """In [0, 1]: half hash agreement, half colour closeness (exp of mean ΔE76 / 25)."""
    agree = 1.0 - np.count_nonzero(hashes != q_hash[None, :], axis=1) / 64.0
    delta = np.linalg.norm((labs - q_lab[None, :]).reshape(len(labs), 64, 3), axis=2).mean(axis=1)
    return 0.5 * agree + 0.5 * np.exp(-delta / 25.0)


def build_image_index(items, out: str | os.PathLike, *, embedder=None, thumb_size: int = 256, source: str | None = None) -> dict:
    """Write an index of `items` ({path, title}); return its manifest."""
    import hashlib

    from PIL import Image

    t0 = time.time()
    digest = hashlib.sha256()
    with atomic_dir(out) as tmp:
        (tmp / "thumbs").mkdir()
        hashes, labs, vecs, n = [], [], [], 0
        with open(tmp / "items.jsonl", "wb") as f:
            for item in streams.progress(items, desc="index images", unit=" images"):
                img = _load(item["path"])
                sha = sha256_file(item["path"])
                thumb = f"thumbs/{sha[:24]}.jpg"
                if not (tmp / thumb).exists():
                    t = img.copy()
                    t.thumbnail((thumb_size, thumb_size), Image.Resampling.LANCZOS)
                    t.save(tmp / thumb, "JPEG", quality=85)
                if embedder is not None:
                    vecs.append(np.asarray(embedder.encode([img], kind="image"), dtype=np.float32)[0])
                else:
                    hashes.append(phash(img))
                    labs.append(lab_grid(img))
                rec = {"title": item["title"], "thumbnail": thumb, "source": str(item["path"]), "sha256": sha}
                line = orjson.dumps(rec) + b"\n"
                digest.update(line)
                f.write(line)
                n += 1
        if n == 0:
            raise MarsError("no images to index")
        if embedder is not None:
            import faiss

            mat = np.ascontiguousarray(np.stack(vecs), dtype=np.float32)
            faiss.normalize_L2(mat)
            index = faiss.IndexFlatIP(mat.shape[1])
            index.add(mat)
            faiss.write_index(index, str(tmp / "clip.faiss"))
            descriptor = f"clip:{getattr(embedder, 'name', 'custom')}"
        else:
            np.save(tmp / "phash.npy", np.stack(hashes))
            np.save(tmp / "lab.npy", np.stack(labs))
            descriptor = WEIGHT_FREE
        manifest = {"format": FORMAT, "format_version": 1, "mars_version": __version__, "source": source,
                    "images": n, "descriptor": descriptor, "items_sha256": digest.hexdigest(),
                    "thumb_size": thumb_size, "build_seconds": round(time.time() - t0, 3)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class ImageIndex:
    """A loaded image index; `search(path, k)` → [(item number, score)] best first. Thread-safe."""

    def __init__(self, path: str | os.PathLike, *, embedder=None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, FORMAT, "an image index", {"descriptor": str, "items_sha256": str})
        self.items = [orjson.loads(x) for x in (self.path / "items.jsonl").read_bytes().splitlines() if x]
        self.embedder = embedder
        if self.manifest["descriptor"] == WEIGHT_FREE:
            self.hashes = np.load(self.path / "phash.npy")
            self.labs = np.load(self.path / "lab.npy")
        else:
            import faiss

            if embedder is None:
                raise MarsError(f"{self.path}: built with {self.manifest['descriptor']}; pass the same model (--model)")
            self.faiss = faiss.read_index(str(self.path / "clip.faiss"))

    def search(self, image: str | os.PathLike, k: int) -> list[tuple[int, float]]:
        img = _load(image)
        if self.manifest["descriptor"] == WEIGHT_FREE:
            scores = similarity(phash(img), lab_grid(img), self.hashes, self.labs)
            order = np.lexsort((np.arange(len(scores)), -scores))[:k]
            return [(int(i), float(scores[i])) for i in order]
        import faiss

        q = np.ascontiguousarray(self.embedder.encode([img], kind="image"), dtype=np.float32)
        faiss.normalize_L2(q)
        s, idx = self.faiss.search(q, min(k, len(self.items)))
        return [(int(i), float(v)) for i, v in zip(idx[0], s[0]) if i >= 0]

    def thumbnail(self, i: int) -> str:
        return str(self.path / self.items[i]["thumbnail"])
