"""The local image index: descriptors, titles sidecars, thumbnails, near-duplicate search."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mars_cli.errors import MarsError
from mars_cli.tools.index_images import ImageIndex, build_image_index, collect_images, lab_grid, phash, similarity


def synthetic(seed: int, size=(320, 240)) -> Image.Image:
    """A distinct picture per seed: coloured blocks and a gradient, enough structure for pHash."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:] = rng.integers(0, 256, 3)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        arr[y0 : y0 + rng.integers(30, 120), x0 : x0 + rng.integers(30, 160)] = rng.integers(0, 256, 3)
    arr[:, :, seed % 3] = (arr[:, :, seed % 3] * 0.5 + np.linspace(0, 127, w)[None, :]).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(8):
        synthetic(i).save(d / f"photo_{i}.png")
    (d / "sub").mkdir()
    synthetic(8).save(d / "sub" / "deep.jpg", quality=95)
    (d / "titles.tsv").write_text("photo_0.png\tThe first photo\nsub/deep.jpg\tA deep one\n")
    return d


def test_lab_and_phash_basics():
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    np.testing.assert_allclose(lab_grid(red)[:3], [53.24, 80.09, 67.20], atol=0.3)  # sRGB red in CIE-Lab (D65)
    img = synthetic(3)
    h = phash(img)
    assert h.shape == (64,) and 20 <= h.sum() <= 44  # median split: about half the bits set
    # a rescaled, recompressed copy keeps almost every bit
    small = img.resize((160, 120))
    assert np.count_nonzero(phash(small) != h) <= 4
    s = similarity(h, lab_grid(img), np.stack([h, phash(synthetic(4))]), np.stack([lab_grid(img), lab_grid(synthetic(4))]))
    assert s[0] == pytest.approx(1.0) and s[1] < 0.8


def test_collect_titles_from_tsv_and_jsonl(folder, tmp_path):
    items = {p["path"].relative_to(folder).as_posix(): p["title"] for p in collect_images(folder)}
    assert items["photo_0.png"] == "The first photo" and items["sub/deep.jpg"] == "A deep one" and items["photo_5.png"] == "photo 5"
    recs = tmp_path / "imgs.jsonl"
    synthetic(1).save(tmp_path / "a.png")
    recs.write_text(json.dumps({"image": "a.png", "title": "Record title"}) + "\n")
    (item,) = collect_images(recs)
    assert item == {"path": tmp_path / "a.png", "title": "Record title"}
    recs.write_text(json.dumps({"title": "no image"}) + "\n")
    with pytest.raises(MarsError, match=r"imgs.jsonl:1: an image record needs"):
        list(collect_images(recs))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarsError, match="no images found"):
        list(collect_images(tmp_path / "empty"))


def test_build_and_find_near_duplicates(folder, tmp_path):
    m = build_image_index(collect_images(folder), tmp_path / "idx", thumb_size=64)
    assert m["images"] == 9 and m["descriptor"] == "phash64+lab8x8"
    ix = ImageIndex(tmp_path / "idx")
    for i in (0, 3, 6):
        q = tmp_path / f"q{i}.jpg"
        synthetic(i).resize((200, 150)).save(q, quality=70)  # resized and re-encoded
        (best, score), *rest = ix.search(q, 3)
        assert ix.items[best]["source"].endswith(f"photo_{i}.png") and score > rest[0][1]
    for it in ix.items:
        with Image.open(ix.path / it["thumbnail"]) as t:
            assert max(t.size) <= 64
    with pytest.raises(MarsError, match="not an image index"):
        ImageIndex(tmp_path)


class MeanColourEmbedder:
    """A stand-in CLIP: the mean colour, enough to exercise the faiss path end to end."""

    name = "mean-colour"

    def encode(self, items, *, kind="image"):
        return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0) - 127.5 for im in items])


def test_model_embeddings_use_faiss(folder, tmp_path):
    emb = MeanColourEmbedder()
    m = build_image_index(collect_images(folder), tmp_path / "clip", embedder=emb)
    assert m["descriptor"] == "clip:mean-colour" and (tmp_path / "clip" / "clip.faiss").exists()
    with pytest.raises(MarsError, match="pass the same model"):
        ImageIndex(tmp_path / "clip")
    ix = ImageIndex(tmp_path / "clip", embedder=emb)
    (best, score), *_ = ix.search(folder / "photo_2.png", 2)
    assert ix.items[best]["source"].endswith("photo_2.png") and score == pytest.approx(1.0, abs=1e-5)


def test_cli_index_images(folder, tmp_path):
    from typer.testing import CliRunner

    from mars_cli.main import app

    r = CliRunner().invoke(app, ["index", "images", str(folder), "--out", str(tmp_path / "idx"), "--thumb-size", "32"])
    assert r.exit_code == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["images"] == 9 and m["descriptor"] == "phash64+lab8x8" and m["thumb_size"] == 32 and m["index"] == str(tmp_path / "idx")
    r = CliRunner().invoke(app, ["index", "images", str(tmp_path / "nothing"), "--out", str(tmp_path / "idx2")])
    assert r.exit_code == 1 and not (tmp_path / "idx2").exists()
