"""The toolbox: one parsed call → a tool message + its tool_calls fields."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from helpers_rollout import FakeTextSearch, make_image
from mars_cli import protocol
from mars_cli.agent.toolbox import EpisodeState, Toolbox, interleave
from mars_cli.errors import ToolError
from mars_cli.records import make_task


@pytest.fixture
def conv(tmp_path):
    img = make_image(tmp_path / "big.jpg", size=(1000, 800))
    task = make_task("t", "q", images=[img])
    return img, protocol.initial_messages(task), EpisodeState(task=task)


def zoom(box, idx=None):
    args = {"bbox_2d": box}
    if idx is not None:
        args["img_idx"] = idx
    return protocol.ToolCall(protocol.ZOOM, args)


def test_zoom_chain_is_cut_from_the_original(tmp_path, conv):
    img, msgs, state = conv
    tb = Toolbox(tmp_path / "art", profile="mars")
    a = tb.run(zoom([200, 250, 600, 750]), msgs, state)
    assert a.ok and a.detail["box_px"] == [200, 200, 600, 600] and a.detail["source"] == img
    msgs = msgs + [{"role": "assistant", "content": "z"}, a.message]
    b = tb.run(zoom([500, 0, 1000, 500], idx=1), msgs, state)
    # the right-top quarter of the first crop = (0.4..0.6, 0.25..0.5) of the original
    assert b.ok and b.detail["source"] == img
    assert b.detail["box"] == pytest.approx([0.4, 0.25, 0.6, 0.5])
    assert b.detail["box_px"] == [400, 200, 600, 400]
    assert Image.open(b.message["content"][1]["image"]).size == (200, 200)
    # the same crop twice is one content-hashed file
    c = tb.run(zoom([200, 250, 600, 750]), msgs, state)
    assert c.message["content"][1]["image"] == a.message["content"][1]["image"]


def test_failures_become_error_messages(tmp_path, conv):
    img, msgs, state = conv
    tb = Toolbox(tmp_path / "art", profile="mars", text_search=FakeTextSearch({"A": "alpha beta"}))
    out = tb.run(zoom([0, 0, 10, 10], idx=3), msgs, state)
    assert not out.ok and "img_idx 3 is out of range" in out.error
    assert out.message["content"][0]["text"].startswith("Error: ") and out.message["name"] == protocol.ZOOM
    out = tb.run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "gamma"}), msgs, state)
    assert not out.ok and "no results" in out.error and out.latency >= 0
    out = tb.run(protocol.ToolCall(protocol.IMAGE_SEARCH, {}), msgs, state)
    assert not out.ok and "not available" in out.error
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    bad_state = EpisodeState(task=make_task("b", "q", images=[str(broken)]))
    out = tb.run(zoom([0, 0, 500, 500]), protocol.initial_messages(bad_state.task), bad_state)
    assert not out.ok and "broken.jpg" in out.error


def test_text_search_result_block(tmp_path, conv):
    _, msgs, state = conv
    ts = FakeTextSearch({"Alpha page": "alpha beta gamma", "Other": "delta"}, latency=0.05)
    out = Toolbox(tmp_path / "art", profile="mars", text_search=ts).run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "alpha"}), msgs, state)
    assert out.ok and out.latency >= 0.05 and out.detail["titles"] == ["Alpha page"]
    assert "Alpha page" in out.message["content"][0]["text"] and out.message["name"] == protocol.TEXT_SEARCH


def test_image_search_thumbnails_follow_their_lines(tmp_path, conv):
    pytest.importorskip("mars_cli.tools.image_search")
    img, msgs, state = conv
    t1, t3 = make_image(tmp_path / "t1.jpg", (40, 40)), make_image(tmp_path / "t3.jpg", (40, 40))

    class Search:
        def search(self, image, k=5, *, task=None):
            assert image == img and task is state.task
            return [{"rank": 1, "title": "one", "thumbnail": t1}, {"rank": 2, "title": "two (no thumbnail)"},
                    {"rank": 3, "title": "three", "thumbnail": t3}]

    out = Toolbox(tmp_path / "art", profile="mars", image_search=Search()).run(protocol.ToolCall(protocol.IMAGE_SEARCH, {}), msgs, state)
    parts = out.message["content"]
    assert out.ok and protocol.message_images([out.message]) == [t1, t3]
    i1 = next(i for i, p in enumerate(parts) if p.get("image") == t1)
    i3 = next(i for i, p in enumerate(parts) if p.get("image") == t3)
    assert parts[i1 - 1]["text"].endswith("Thumbnail 1:") and parts[i3 - 1]["text"].endswith("Thumbnail 3:")


def test_interleave_keeps_every_thumbnail():
    parts = interleave("Results:\nTitle 1: a\nThumbnail 1:", ["x.jpg", "y.jpg"])
    assert [p.get("image") for p in parts if p["type"] == "image"] == ["x.jpg", "y.jpg"]
    assert "".join(p.get("text", "") for p in parts) == "Results:\nTitle 1: a\nThumbnail 1:"
    assert interleave("No results.", []) == [{"type": "text", "text": "No results."}]


def test_calls_of_many_episodes_run_safely_in_threads(tmp_path, conv):
    img, msgs, _ = conv
    tb = Toolbox(tmp_path / "art", profile="mars")
    states = [EpisodeState(task={"id": i}) for i in range(8)]
    outs = [None] * 8

    def work(i):
        outs[i] = tb.run(zoom([i * 100, 0, i * 100 + 200, 500]), msgs, states[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o.ok for o in outs)
    assert [o.detail["box_px"][0] for o in outs] == [i * 100 for i in range(8)]
    assert all(len(s.provenance) == 1 for s in states)


def test_tool_error_type_is_caught(tmp_path, conv):
    _, msgs, state = conv

    class Failing:
        def search(self, query, k=5):
            raise ToolError("backend timed out after 10 s")

    out = Toolbox(tmp_path / "art", profile="mars", text_search=Failing()).run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "q"}), msgs, state)
    assert not out.ok and out.error == "backend timed out after 10 s"
    assert out.message["content"][0]["text"] == "Error: backend timed out after 10 s"


def test_unexpected_tool_bug_is_contained(tmp_path, conv, capsys):
    _, msgs, state = conv

    class Buggy:
        def search(self, query, k=5):
            return sorted([{"rank": 1}, {"rank": 2}])  # a TypeError inside a backend

    out = Toolbox(tmp_path / "art", profile="mars", text_search=Buggy()).run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "q"}), msgs, state)
    assert not out.ok and "internal error in text_search_tool: TypeError" in out.error
    assert out.message["content"][0]["text"] == "Error: the text_search_tool tool failed"
    assert "internal error" in capsys.readouterr().err
