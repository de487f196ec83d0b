"""The toolbox under the sensenova profile: official results, crop rule and `infra`."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from helpers_rollout import FakeTextSearch, make_image
from mars_cli import protocol
from mars_cli.agent.toolbox import EpisodeState, Toolbox
from mars_cli.errors import ToolError
from mars_cli.records import make_task


def official_size(h: int, w: int, factor=32, lo=65536, hi=8294400) -> tuple[int, int]:
    """eval.py's smart_resize, restated: (height, width)."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = math.floor(int(h / beta) / factor) * factor, math.floor(int(w / beta) / factor) * factor
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(int(h * beta) / factor) * factor, math.ceil(int(w * beta) / factor) * factor
    return hb, wb


@pytest.fixture
def conv(tmp_path):
    img = make_image(tmp_path / "big.jpg", size=(1000, 800))
    task = make_task("t", "q", images=[img])
    return img, protocol.initial_messages(task), EpisodeState(task=task)


def zoom(box, idx=0, label="x"):
    return protocol.ToolCall(protocol.ZOOM, {"bbox_2d": box, "label": label, "img_idx": idx})


def test_zoom_follows_the_official_crop_rule(tmp_path, conv):
    img, msgs, state = conv
    tb = Toolbox(tmp_path / "art")  # sensenova is the default
    out = tb.run(zoom([100, 100, 120, 110]), msgs, state)
    assert out.ok and not out.infra
    assert out.message["content"][0]["text"] == "Here is the zoomed image:"
    path = out.message["content"][1]["image"]
    assert path.endswith(".png")  # lossless
    # model view of 1000x800 at factor 32: 992x800; the box is 19x8 px there,
    # stretched to 28x28, then smart-resized up to at least 65,536 pixels
    vh, vw = official_size(800, 1000)
    assert out.detail["box_px"] == [int(0.1 * vw), int(0.1 * vh), int(0.12 * vw), int(0.11 * vh)]
    h, w = official_size(28, 28)
    assert Image.open(path).size == (w, h) and w * h >= 65536


def test_zoom_errors_are_the_official_texts_and_the_models_fault(tmp_path, conv):
    _, msgs, state = conv
    tb = Toolbox(tmp_path / "art")
    out = tb.run(zoom([0, 0, 10, 10], idx=3), msgs, state)
    assert not out.ok and not out.infra
    assert out.message["content"][0]["text"] == "Error: Image at index 3 not found. Available images: 1"
    out = tb.run(zoom([500, 0, 400, 10]), msgs, state)
    assert out.message["content"][0]["text"] == (
        "Error: Invalid bbox coordinates: x1 must be < x2, y1 must be < y2. Got: [500, 0, 400, 10]")
    assert not out.infra


def test_text_search_summary_format_and_cut(tmp_path, conv):
    _, msgs, state = conv

    class Summarized(FakeTextSearch):
        def search(self, query, k=5):
            res = super().search(query, k)
            res[0]["query_summary"] = "S" * 9000 + "END"
            return res

    ts = Summarized({"Alpha page": "alpha beta"})
    out = Toolbox(tmp_path / "art", text_search=ts).run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "alpha"}), msgs, state)
    text = out.message["content"][0]["text"]
    full = "Final summary generated for query: alpha\n" + "S" * 9000 + "END"
    assert text == "(truncated)..." + full[-8192:]
    out = Toolbox(tmp_path / "art", text_search=ts).run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "zzz"}), msgs, state)
    assert not out.ok and out.infra  # no results: the backend's, not the model's


def test_image_search_official_layout_and_empty_results(tmp_path, conv):
    img, msgs, state = conv
    thumbs = [make_image(tmp_path / f"t{i}.jpg", (40, 40)) for i in range(7)]

    class Search:
        def __init__(self, n):
            self.n = n

        def search(self, image, k=5, *, task=None):
            if not self.n:
                raise ToolError("no precomputed image search results for this task")
            return [{"title": f"T{i}", "thumbnail": thumbs[i]} for i in range(min(self.n, k))]

    out = Toolbox(tmp_path / "art", image_search=Search(7), image_k=10).run(protocol.ToolCall(protocol.IMAGE_SEARCH, {}), msgs, state)
    parts = out.message["content"]
    assert parts[0] == {"type": "text", "text": "Reverse Image Search Results:"}
    assert parts[1] == {"type": "text", "text": "\n\nTitle 1: T0\nThumbnail 1: "} and parts[2]["image"] == thumbs[0]
    assert sum(p["type"] == "image" for p in parts) == 5  # the first five, as eval.py
    out = Toolbox(tmp_path / "art", image_search=Search(0)).run(protocol.ToolCall(protocol.IMAGE_SEARCH, {}), msgs, state)
    assert out.ok and out.infra and out.message["content"][0]["text"] == "No matching images were found."
    mars = Toolbox(tmp_path / "art", image_search=Search(0), profile="mars").run(protocol.ToolCall(protocol.IMAGE_SEARCH, {}), msgs, state)
    assert not mars.ok and mars.infra


def test_mars_profile_marks_infra_and_model_faults(tmp_path, conv):
    _, msgs, state = conv
    tb = Toolbox(tmp_path / "art", profile="mars")
    assert not tb.run(zoom([0, 0, 10, 10], idx=5), msgs, state).infra
    out = tb.run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "a"}), msgs, state)
    assert not out.ok and out.infra  # no backend configured
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    st = EpisodeState(task=make_task("b", "q", images=[str(broken)]))
    assert tb.run(zoom([0, 0, 500, 500]), protocol.initial_messages(st.task), st).infra
