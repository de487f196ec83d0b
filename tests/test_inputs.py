"""Inputs: ask's image as a path or URL, checked before any model loads; plain-text queries on stdin."""

from __future__ import annotations

import http.server
import io
import json
import threading

import pytest
from PIL import Image

from clirun import Ran
from mars_cli.errors import MarsError
from mars_cli.inputs import local_image, query_items


def png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def server():
    body = {"/a.png": (png_bytes(), "image/png"), "/page": (b"<html>hi</html>", "text/html")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data, ctype = body.get(self.path, (b"", "text/plain"))
            self.send_response(200 if data else 404)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_url_is_fetched_once_by_content(server, tmp_path):
    path = local_image(server + "/a.png", tmp_path / "art", allow_private=True)
    assert path.endswith(".png") and open(path, "rb").read() == png_bytes()
    assert local_image(server + "/a.png", tmp_path / "art", allow_private=True) == path
    with pytest.raises(MarsError, match="not an image \\(got text/html"):
        local_image(server + "/page", tmp_path / "art", allow_private=True)


def test_ask_refuses_before_the_model_loads(server, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    missing_model = str(tmp_path / "no-model")
    r = Ran(["ask", tmp_path / "notes.txt", "q?", "--policy", missing_model, "--artifacts", tmp_path / "art"])
    assert r.exit_code == 1 and "notes.txt: not an image" in r.stderr and "no-model" not in r.stderr
    r = Ran(["ask", tmp_path / "nope.jpg", "q?", "--policy", missing_model])
    assert r.exit_code == 1 and "nope.jpg: no such image file" in r.stderr
    # a loopback URL: the same SSRF guard as search's page fetches, and still before the model
    r = Ran(["ask", server + "/a.png", "q?", "--policy", missing_model, "--artifacts", tmp_path / "art"])
    assert r.exit_code == 1 and "non-public address" in r.stderr and "no-model" not in r.stderr
    r = Ran(["ask", "ftp://x/a.png", "q?", "--policy", missing_model])
    assert r.exit_code == 1 and "only http(s) URLs and local files" in r.stderr


def test_query_lines(tmp_path):
    stream = io.BytesIO('eiffel tower height\n\n{"query": "nile", "id": 7}\n\ufeffbig ben\n'.encode())
    items = [rec for _, rec in query_items(stream=stream)]
    assert items == [{"query": "eiffel tower height"}, {"query": "nile", "id": 7}, {"query": "big ben"}]
    with pytest.raises(MarsError, match="<stdin>:1: invalid JSON"):
        list(query_items(stream=io.BytesIO(b'{"query": \n')))


def test_search_reads_plain_text_lines(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "d2", "contents": '"Nile"\nThe Nile is a river in Africa.'}) + "\n"
                      + json.dumps({"id": "d3", "contents": '"Big Ben"\nBig Ben is a bell in London.'}) + "\n")
    assert Ran(["index", "text", corpus, "-o", tmp_path / "idx"]).exit_code == 0
    r = Ran(["search", "--index", tmp_path / "idx", "-k", "1", "--group"], input="river in africa\nbell in london\n")
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["query"] for x in recs] == ["river in africa", "bell in london"]
    assert [x["results"][0]["doc_id"] for x in recs] == ["d2", "d3"]
