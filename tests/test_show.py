"""`mars show`: page structure, zoom boxes, escaping, embedding, and the page in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mars_cli import protocol as P
from mars_cli.eval.show import zoom_boxes
from mars_cli.main import app

CHROMIUM = "/usr/bin/chromium"
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture(autouse=True)
def plain_errors(monkeypatch):
    import typer.core

    monkeypatch.setattr(typer.core, "HAS_RICH", False)


class Page(HTMLParser):
    """Collects the page's elements (tag, attrs) and every script body."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if tag == "script":
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data

    def find(self, tag, **attrs):
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text())
    return p


def episode(tmp_path: Path, i: int, *, acc, bench="synth", question="Which city?", extra_turns=()) -> dict:
    img = tmp_path / "images" / f"scene{i}.png"
    img.parent.mkdir(exist_ok=True)
    Image.new("RGB", (400, 200), (i * 30 % 255, 90, 160)).save(img)
    crop = tmp_path / "artifacts" / f"crop{i}.png"
    crop.parent.mkdir(exist_ok=True)
    Image.new("RGB", (80, 40), (250, 214, 40)).save(crop)
    task = {"id": f"t{i}", "question": question, "images": [str(img)], "answers": ["Paris"], "benchmark": bench, "meta": {}}
    messages = P.initial_messages(task) + [
        {"role": "assistant", "content": P.format_assistant("zoom", call=(P.ZOOM, {"bbox_2d": [100, 200, 300, 600], "label": "sign"}))},
        P.tool_message(P.ZOOM, P.ZOOM_HEADER, [str(crop)]),
        *extra_turns,
        {"role": "assistant", "content": P.format_assistant("done", answer="Paris")},
    ]
    rec = {**task, "group": task["id"], "sample": 0, "messages": messages, "tool_calls": [], "prediction": "Paris",
           "finish": "answer", "tokens": None}
    if acc is not None:
        rec.update(rewards={"accuracy": acc, "format": 1.0}, reward=acc + 0.5)
    return rec


def write(tmp_path: Path, recs: list[dict]) -> Path:
    f = tmp_path / "traj.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return f


def show(*args):
    return CliRunner().invoke(app, ["show", *map(str, args)])


def test_zoom_boxes_compose_through_crops_and_skip_thumbnails():
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "image", "image": "b.jpg"}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": P.format_assistant("t", call=(P.ZOOM, {"bbox_2d": [500, 0, 1000, 500]}))},
        P.tool_message(P.ZOOM, P.ZOOM_HEADER, ["c1.jpg"]),  # image 2 = right-top quarter of a
        {"role": "assistant", "content": P.format_assistant("t", call=(P.ZOOM, {"bbox_2d": [0, 500, 500, 1000], "img_idx": 2, "label": "x"}))},
        P.tool_message(P.ZOOM, P.ZOOM_HEADER, ["c2.jpg"]),  # image 3
        {"role": "assistant", "content": P.format_assistant("t", call=(P.IMAGE_SEARCH, {"img_idx": 1}))},
        P.tool_message(P.IMAGE_SEARCH, "results", ["thumb.jpg"]),  # image 4: no origin
        {"role": "assistant", "content": P.format_assistant("t", call=(P.ZOOM, {"bbox_2d": [0, 0, 10, 10], "img_idx": 4}))},
        P.tool_message(P.ZOOM, P.ZOOM_HEADER, ["c3.jpg"]),
        {"role": "assistant", "content": P.format_assistant("t", call=(P.ZOOM, {"bbox_2d": [0, 0, 1000, 100], "img_idx": 1}))},
        P.tool_message(P.ZOOM, P.ZOOM_HEADER, ["c4.jpg"]),
        {"role": "assistant", "content": P.format_assistant("t", call=(P.ZOOM, {"bbox_2d": [0, 0, 1000, 1000], "img_idx": 3}))},
    ]
    boxes = zoom_boxes(msgs)
    assert [b["turn"] for b in boxes[0]] == [1, 2, 6] and [b["turn"] for b in boxes[1]] == [5]
    assert boxes[0][0]["box"] == pytest.approx((0.5, 0.0, 1.0, 0.5))
    assert boxes[0][1]["box"] == pytest.approx((0.5, 0.25, 0.75, 0.5)) and boxes[0][1]["label"] == "x"
    assert boxes[0][2]["box"] == pytest.approx((0.5, 0.25, 0.75, 0.5))  # the whole of crop c2
    assert boxes[1][0]["box"] == pytest.approx((0.0, 0.0, 1.0, 0.1))


def test_page_structure_links_and_boxes(tmp_path):
    recs = [episode(tmp_path, 0, acc=1.0), episode(tmp_path, 1, acc=0.0, bench="vstar"), episode(tmp_path, 2, acc=None)]
    (tmp_path / "site").mkdir()
    out = tmp_path / "site" / "page.html"
    r = show(write(tmp_path, recs), "-o", out)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["episodes"] == 3
    page = parse(out)
    eps = page.find("article")
    assert [(e["data-benchmark"], e["data-outcome"], e["data-reward"]) for e in eps] == [
        ("synth", "correct", "1.5"), ("vstar", "wrong", "0.5"), ("synth", "missing", "")]
    imgs = page.find("img")
    assert all(i["loading"] == "lazy" for i in imgs)
    srcs = [i["src"] for i in imgs]
    assert srcs[:2] == ["../images/scene0.png", "../artifacts/crop0.png"]
    assert not any(s.startswith(("data:", "http")) for s in srcs)
    box = page.find("div", **{"class": "box"})[0]
    assert box["style"] == "left:10.000%;top:20.000%;width:20.000%;height:40.000%"
    assert [o["value"] for o in page.find("option")][:3] == ["", "synth", "vstar"]
    assert "http" not in "".join(a.get("href", "") + a.get("src", "") for _, a in page.elements if _ in ("link", "script"))
    text = out.read_text()
    assert "Paris" in text and "Here is the zoomed image:" in text and "turn 1 · assistant" in text


def test_everything_from_records_is_escaped(tmp_path):
    rec = episode(tmp_path, 0, acc=1.0, bench=EVIL, question=EVIL)
    rec["id"] = EVIL
    rec["prediction"] = EVIL
    rec["messages"].append({"role": "tool", "name": EVIL, "content": [{"type": "text", "text": EVIL}, {"type": "image", "image": "javascript:alert(1)"}]})
    out = tmp_path / "page.html"
    assert show(write(tmp_path, [rec]), "-o", out).exit_code == 0
    page = parse(out)
    # The only script is ours; no element carries an event handler; no javascript: URL.
    assert len(page.scripts) == 1 and "alert" not in page.scripts[0]
    assert not [a for _, a in page.elements for k in a if k.startswith("on")]
    assert "javascript:" not in " ".join(a.get("src", "") for _, a in page.elements)
    assert page.find("article")[0]["data-benchmark"] == EVIL  # round-trips as text
    assert "<script>alert" not in out.read_text()


def test_embed_inlines_downscaled_thumbnails(tmp_path):
    rec = episode(tmp_path, 0, acc=1.0)
    big = tmp_path / "images" / "big.png"
    Image.new("RGB", (3000, 1500), (1, 2, 3)).save(big)
    rec["messages"][1]["content"][0]["image"] = str(big)
    rec["messages"].append(P.tool_message(P.ZOOM, "gone", [str(tmp_path / "missing.png")]))
    out = tmp_path / "page.html"
    r = show(write(tmp_path, [rec]), "-o", out, "--embed")
    assert r.exit_code == 0, r.stderr
    page = parse(out)
    srcs = [i["src"] for i in page.find("img")]
    assert all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    import base64
    import io

    first = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert max(first.size) <= 768
    assert "image not available: missing.png" in out.read_text()


def test_bad_record_names_line_and_writes_nothing(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(episode(tmp_path, 0, acc=1.0)) + "\n" + json.dumps({"id": "x"}) + "\n")
    out = tmp_path / "page.html"
    r = show(f, "-o", out)
    assert r.exit_code == 1 and f"mars show: {f}:2: missing field 'question'" in r.stderr
    assert not out.exists()


def chromium_dom(page: Path, tmp_path: Path, fragment: str = "") -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri() + fragment]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True).stdout


@pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None,
                    reason="headless check needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_headless_chromium_runs_the_filters(tmp_path):
    recs = [episode(tmp_path, 0, acc=1.0), episode(tmp_path, 1, acc=0.0, bench="vstar"),
            episode(tmp_path, 2, acc=None), episode(tmp_path, 3, acc=0.0, question="Which river?")]
    out = tmp_path / "page.html"
    assert show(write(tmp_path, recs), "-o", out).exit_code == 0
    dom = chromium_dom(out, tmp_path)
    assert "showing 4 of 4 episodes" in dom  # the script ran
    dom = chromium_dom(out, tmp_path, "#outcome=wrong")
    assert "showing 2 of 4 episodes" in dom
    hidden = re.findall(r'<article class="ep"([^>]*)>', dom)
    assert ["hidden" in a for a in hidden] == [True, False, True, False]
    assert "showing 1 of 4 episodes" in chromium_dom(out, tmp_path, "#outcome=wrong&benchmark=vstar")
    assert "showing 1 of 4 episodes" in chromium_dom(out, tmp_path, "#q=river")


def test_base_resolves_relative_image_paths(tmp_path, monkeypatch):
    rec = episode(tmp_path, 0, acc=1.0)
    rec["messages"][1]["content"][0]["image"] = "images/scene0.png"
    (tmp_path / "web").mkdir()
    monkeypatch.chdir(tmp_path / "web")
    out = tmp_path / "web" / "page.html"
    assert show(write(tmp_path, [rec]), "-o", out).exit_code == 0
    assert parse(out).find("img")[0]["src"] == "../images/scene0.png"  # found beside the record file
    r = CliRunner().invoke(app, ["show", "-o", str(out)], input=json.dumps(rec) + "\n")
    assert r.exit_code == 0 and parse(out).find("img")[0]["src"] == "images/scene0.png"  # stdin: relative to cwd (web/)
    r = CliRunner().invoke(app, ["show", "-o", str(out), "--image-root", str(tmp_path)], input=json.dumps(rec) + "\n")
    assert r.exit_code == 0 and parse(out).find("img")[0]["src"] == "../images/scene0.png"
