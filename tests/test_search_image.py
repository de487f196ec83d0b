"""Image search: local, precomputed and serper (Lens) backends, rendering, cache, CLI."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from fakeservers import FakeServer, serper_routes
from mars_cli.errors import MarsError, ToolError
from mars_cli.main import app
from mars_cli.tools.image_search import open_image_search, render_image_results
from mars_cli.tools.index_images import build_image_index, collect_images
from test_index_images import synthetic

runner = CliRunner()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    d = tmp_path_factory.mktemp("lib")
    for i in range(5):
        synthetic(10 + i).save(d / f"landmark_{i}.png")
    (d / "titles.jsonl").write_text("".join(json.dumps({"file": f"landmark_{i}.png", "title": f"Landmark number {i}"}) + "\n" for i in range(5)))
    build_image_index(collect_images(d), d / "idx")
    return d / "idx"


def test_local_search_of_a_crop_like_copy_and_render(index, tmp_path):
    q = tmp_path / "copy.jpg"
    synthetic(12).resize((240, 180)).save(q, quality=80)
    res = open_image_search("local", index=str(index)).search(str(q), k=3)
    assert [r["rank"] for r in res] == [1, 2, 3] and res[0]["title"] == "Landmark number 2" and res[0]["backend"] == "local"
    text, thumbs = render_image_results(res)
    assert text.splitlines()[:3] == ["Reverse Image Search Results:", "Title 1: Landmark number 2", "Thumbnail 1:"]
    assert thumbs == [r["thumbnail"] for r in res] and all(Image.open(t).size for t in thumbs)
    assert render_image_results([]) == ("Reverse Image Search Results:\nNo results.", [])


def test_local_bad_inputs_are_tool_errors(index, tmp_path):
    s = open_image_search("local", index=str(index))
    with pytest.raises(ToolError, match="missing.jpg: no such file"):
        s.search(str(tmp_path / "missing.jpg"))
    (tmp_path / "not.jpg").write_text("hello")
    with pytest.raises(ToolError):
        s.search(str(tmp_path / "not.jpg"))
    with pytest.raises(ToolError, match="k must be"):
        s.search(str(tmp_path / "not.jpg"), k=0)


def test_cache_keys_by_image_content(index, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    synthetic(11).save(a)
    b.write_bytes(a.read_bytes())
    s = open_image_search("local", index=str(index), cache=str(tmp_path / "c"))
    first = s.search(str(a))
    assert s.search(str(b)) == first and (s.cache.hits, s.cache.misses) == (1, 1)
    r = open_image_search("local", index=str(index), cache=str(tmp_path / "c"), replay=True)
    assert r.search(str(b)) == first
    synthetic(13).save(tmp_path / "other.png")
    with pytest.raises(ToolError, match="replay"):
        r.search(str(tmp_path / "other.png"))


def test_precomputed_resolves_relative_thumbnails(tmp_path):
    task = {"id": "t", "question": "?", "images": ["img.jpg"], "image_search_title_list": ["A", "B", "C"],
            "image_search_thumbnail_list": ["thumbs/a.jpg", "/abs/b.jpg", "thumbs/c.jpg"], "meta": {"data_dir": "/data/hr"}}
    res = open_image_search("precomputed").search("artifacts/crop.jpg", k=2, task=task)
    assert res == [{"rank": 1, "title": "A", "thumbnail": "/data/hr/thumbs/a.jpg", "score": 1.0, "backend": "precomputed"},
                   {"rank": 2, "title": "B", "thumbnail": "/abs/b.jpg", "score": 0.5, "backend": "precomputed"}]
    assert open_image_search("precomputed", data_dir=str(tmp_path)).search("x", task=task)[0]["thumbnail"] == f"{tmp_path}/thumbs/a.jpg"
    with pytest.raises(ToolError, match="needs the task record"):
        open_image_search("precomputed").search("x")
    with pytest.raises(ToolError, match="no precomputed"):
        open_image_search("precomputed").search("x", task={"id": "t"})


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.network
def test_serper_lens(monkeypatch, tmp_path):
    monkeypatch.setenv("SERPER_API_KEY", "test-key")
    routes = {("GET", "/t1.png"): lambda req: (200, {"Content-Type": "image/png"}, _png((255, 0, 0))),
              ("GET", "/t2.png"): lambda req: (200, {"Content-Type": "text/html"}, b"<html>not an image</html>")}
    with FakeServer(routes) as srv:
        lens = [{"title": "Red square", "link": "https://e.org/1", "thumbnailUrl": f"{srv.url}/t1.png"},
                {"title": "Broken", "link": "https://e.org/2", "thumbnailUrl": f"{srv.url}/t2.png"},
                {"title": "Red again", "link": "https://e.org/3", "imageUrl": f"{srv.url}/t1.png"}]
        srv.routes.update(serper_routes([], lens))
        s = open_image_search("serper", serper_url=srv.url, artifacts=str(tmp_path / "art"), allow_private=True, backoff=0.001)
        res = s.search("https://example.org/photo.jpg", k=5)
        with pytest.raises(ToolError, match="public URL; /local/crop.jpg is a local file"):
            s.search("/local/crop.jpg")
        body = [c["json"] for c in srv.calls if c["path"] == "/lens"]
    assert body == [{"url": "https://example.org/photo.jpg"}]
    assert [r["title"] for r in res] == ["Red square", "Red again"] and [r["rank"] for r in res] == [1, 2]
    assert res[0]["thumbnail"] == res[1]["thumbnail"] and Image.open(res[0]["thumbnail"]).getpixel((0, 0)) == (255, 0, 0)
    monkeypatch.delenv("SERPER_API_KEY")
    with pytest.raises(MarsError, match="SERPER_API_KEY"):
        open_image_search("serper")


def test_cli_image_search(index, tmp_path):
    q = tmp_path / "q.png"
    synthetic(14).save(q)
    r = runner.invoke(app, ["image-search", "--index", str(index), "-k", "2", str(q)])
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(recs) == 2 and recs[0]["image"] == str(q) and recs[0]["title"] == "Landmark number 4"
    task = {"id": "t1", "question": "where?", "images": [str(q)]}
    r = runner.invoke(app, ["image-search", "--index", str(index), "--group", "-k", "1"], input=json.dumps(task) + "\n")
    (rec,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert rec["id"] == "t1" and rec["context"] == "Reverse Image Search Results:\nTitle 1: Landmark number 4\nThumbnail 1:"
    assert rec["thumbnails"] == [rec["image_results"][0]["thumbnail"]]
