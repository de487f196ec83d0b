"""`mars show`: summary at the top, samples of a task together (side by side on demand),
thumbnail grids, portrait photos bounded in height (measured in headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mars_cli import protocol as P
from mars_cli.main import app

CHROMIUM = "/usr/bin/chromium"


def traj(tmp_path, group, sample, acc, size=(400, 200), thumbs=0, finish="answer"):
    img = tmp_path / f"{group}.png"
    if not img.exists():
        Image.new("RGB", size, (30, 90, 160)).save(img)
    task = {"id": group, "question": "Which city?", "images": [str(img)], "answers": ["Paris"], "benchmark": "b1"}
    messages = P.initial_messages(task)
    calls = []
    if thumbs:
        paths = []
        for k in range(thumbs):
            t = tmp_path / f"th{k}.png"
            Image.new("RGB", (60, 40), (k * 40, 20, 20)).save(t)
            paths.append(str(t))
        text = "".join(f"Title: result {k}\nThumbnail {k + 1}:" for k in range(thumbs))
        from mars_cli.agent.toolbox import interleave

        messages += [{"role": "assistant", "content": P.format_assistant("look", call=(P.IMAGE_SEARCH, {"img_idx": 0}))},
                     {"role": "tool", "name": P.IMAGE_SEARCH, "content": interleave(text, paths)}]
        calls.append({"turn": 0, "name": P.IMAGE_SEARCH, "arguments": {}, "ok": True, "error": None, "latency": 0.1})
    messages.append({"role": "assistant", "content": P.format_assistant("done", answer="Paris")})
    return {**task, "group": group, "sample": sample, "messages": messages, "tool_calls": calls, "prediction": "Paris",
            "finish": finish, "tokens": None, "rewards": {"accuracy": acc, "format": 1.0}, "reward": acc + 0.5}


def build(tmp_path, recs):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "page.html"
    r = CliRunner().invoke(app, ["show", str(f), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out.read_text()


def test_summary_groups_and_thumbnail_grid(tmp_path):
    recs = [traj(tmp_path, "a", 0, 1.0, thumbs=3), traj(tmp_path, "b", 0, 0.0), traj(tmp_path, "a", 1, 0.0),
            traj(tmp_path, "b", 1, 0.0, finish="error")]
    page = build(tmp_path, recs)
    summary = re.search(r'<section class="summary">(.*?)</section>', page).group(1)
    assert page.index('<section class="summary">') < page.index("<main>")  # at the top
    assert "<td class=\"acc\">25.0%</td>" in summary  # accuracy
    assert "0.25 (image_search_tool 0.25)" in summary  # tools per episode (1 call over 4 episodes)
    assert '<span class="fin-error">error 1</span>' in summary
    groups = re.findall(r'<section class="group multi">(.*?)</section>', page, re.S)
    assert len(groups) == 2 and [len(re.findall(r"<article", g)) for g in groups] == [2, 2]
    assert re.findall(r'data-search="([a-z])', page) == ["a", "a", "b", "b"]  # a task's samples together
    assert 'id="f-sbs"' in page  # the side-by-side switch
    grid = re.search(r'<div class="thumbs">(.*?)</div>', page, re.S).group(1)
    assert grid.count('<figure class="thumb">') == 3 and "Title: result 1" in grid


def test_no_switch_without_groups(tmp_path):
    page = build(tmp_path, [traj(tmp_path, "a", 0, 1.0), traj(tmp_path, "b", 0, 1.0)])
    assert 'id="f-sbs"' not in page and "group multi" not in page


@pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None, reason="needs Debian's chromium")
def test_portrait_bounded_and_side_by_side_in_chromium(tmp_path):
    recs = [traj(tmp_path, "p", 0, 1.0, size=(600, 2400)), traj(tmp_path, "p", 1, 0.0)]
    page = build(tmp_path, recs)
    probe = ("<script>window.addEventListener('load', function () {"
             "var img = document.querySelector('figure.src img'), fig = img.parentNode, eps = document.querySelectorAll('article.ep');"
             "document.body.dataset.probe = JSON.stringify({h: img.getBoundingClientRect().height, vh: window.innerHeight,"
             " iw: img.getBoundingClientRect().width, fw: fig.getBoundingClientRect().width,"
             " top0: eps[0].getBoundingClientRect().top, top1: eps[1].getBoundingClientRect().top});});</script>")
    # the page's own policy allows inline scripts only; the probe goes in as one
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    dom = []
    for frag in ("", "#sbs=1"):
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1400,900",
               "--virtual-time-budget=3000", f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
               (tmp_path / "probe.html").as_uri() + frag]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        m = re.search(r'data-probe="([^"]+)"', p.stdout)
        assert m, p.stderr[-2000:]
        dom.append(json.loads(m.group(1).replace("&quot;", '"')))
    stacked, side = dom
    assert stacked["h"] <= 0.7 * stacked["vh"] + 1  # a 1:4 portrait photo does not fill the screen
    assert abs(stacked["iw"] - stacked["fw"]) < 2  # the figure hugs the image, so zoom boxes stay aligned
    assert stacked["top1"] > stacked["top0"] + 100 and abs(side["top1"] - side["top0"]) < 2
