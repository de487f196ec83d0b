"""Regressions of the hardening pass, data side: hostile model turns, records, images, engines.

Each test is named after the failure it guards against (the item's code in brackets).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mars_cli import protocol as P
from mars_cli.errors import MarsError, RecordError
from mars_cli.jsonl import Where, dumps


def _img(path, size=(64, 48), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


# -- D1, W6, C6: the protocol parser ------------------------------------------------------

def test_d1_deeply_nested_tool_call_is_an_error_observation():
    turn = P.parse_turn("<tool_call>" + "[" * 5000 + "</tool_call>")
    assert turn.call is None and "nested more than" in turn.error
    dumps({"raw": turn.raw_call})


@pytest.mark.parametrize("args,why", [
    ('{"bbox_2d": [0, 0, NaN, 10]}', "NaN is not a JSON number"),
    ('{"bbox_2d": [0, 0, Infinity, 10]}', "Infinity is not a JSON number"),
    ('{"bbox_2d": [0, 0, 1e999, 10]}', "out of range"),
    ('{"bbox_2d": [0, 0, 10, 10], "img_idx": 99999999999999999999999}', "does not fit in 64 bits"),
    ('{"bbox_2d": [0, 0, 10, 10], "label": "\\ud800"}', "unpaired surrogate"),
])
def test_d1_unwritable_arguments_are_refused_at_parse_time(args, why):
    turn = P.parse_turn(f'<tool_call>{{"name": "image_zoom_in_tool", "arguments": {args}}}</tool_call>')
    assert turn.call is None and why in turn.error
    dumps({"raw": turn.raw_call, "error": turn.error})  # the record writer takes all of it


def test_d1_arguments_as_a_json_string_get_the_same_checks():
    turn = P.parse_turn('<tool_call>{"name": "text_search_tool", "arguments": "{\\"query\\": \\"a\\", \\"n\\": NaN}"}</tool_call>')
    assert turn.call is None and "NaN" in turn.error


def test_d1_lone_surrogate_in_the_text_itself_is_replaced():
    turn = P.parse_turn("<thinking>\ud800</thinking><answer>a\udc00b</answer>")
    assert turn.answer == "a\ufffdb" and turn.thinking == "\ufffd"
    dumps({"answer": turn.answer, "thinking": turn.thinking})


def test_w6_answer_inside_unclosed_thinking_is_not_the_answer():
    assert P.parse_turn("<thinking>maybe <answer>A</answer> then").action == "none"
    assert P.extract_answer("<thinking>a</thinking> <thinking>b <answer>A</answer>") is None
    assert P.extract_answer("<thinking>a</thinking><answer>B</answer>") == "B"


def test_w6_nested_answers_give_the_inner_text():
    assert P.extract_answer("<answer><answer>A</answer></answer>") == "A"
    assert P.parse_turn("<thinking>x</thinking><answer> <answer>C</answer>").answer == "C"


def test_c6_more_than_ten_choices_are_lettered_to_z():
    task = {"question": "Which?", "choices": [f"c{i}" for i in range(26)]}
    text = P.question_text(task)
    assert "K. c10" in text and "Z. c25" in text
    from mars_cli.records import validate

    with pytest.raises(RecordError, match="at most 26"):
        validate({"id": "t", "question": "q", "choices": [str(i) for i in range(27)]}, "task", Where("t.jsonl", 3))


# -- C5: schema checks for what the stages read -------------------------------------------

def _judged():
    return {"id": "t", "question": "q", "group": "t", "sample": 0, "prediction": "a", "finish": "answer",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}], "tool_calls": [],
            "rewards": {"accuracy": 1.0}, "reward": 1.0}


C5_CASES = [
    ("tool_calls", [1, "x"], "field 'tool_calls' must be a list of tool call objects"),
    ("messages", [1], "field 'messages' must be a list of chat messages"),
    ("messages", [{"role": "user", "content": [1]}], "field 'messages' must be"),
    ("rewards", {"accuracy": "1"}, "field 'rewards' must be an object of numbers"),
]


# judge reads tool_calls (format reward) but neither messages nor rewards (it replaces them).
@pytest.mark.parametrize("command,field,value,msg", [(c, *case) for c in ("judge", "eval", "show") for case in C5_CASES
                                                      if c != "judge" or case[0] == "tool_calls"])
def test_c5_malformed_fields_are_file_line_errors_in_judge_eval_show(tmp_path, command, field, value, msg):
    from clirun import Ran

    rec = _judged()
    rec[field] = value
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps(_judged()) + "\n" + json.dumps(rec) + "\n")
    extra = ["-o", tmp_path / "p.html"] if command == "show" else []
    r = Ran([command, f, *extra])
    assert r.exit_code == 1 and f"{f}:2: {msg}" in r.stderr


# -- S1, S2, S4, W5: one bounded image reader ---------------------------------------------

def test_s1_fifo_and_device_images_are_refused_before_reading(tmp_path):
    from mars_cli import images

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for bad in (fifo, "/dev/zero"):
        with pytest.raises(MarsError, match=f"^{bad}: not a regular file$"):
            images.load_array(bad)


def test_s1_crop_and_image_search_on_a_fifo_are_exit_1_first_line(tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    (tmp_path / "imgs").mkdir()
    _img(tmp_path / "imgs" / "a.png")
    for args in (["crop", fifo, "0", "0", "1", "1", "-o", tmp_path / "c.jpg"],
                 ["index", "images", tmp_path / "imgs", "--out", tmp_path / "idx"],
                 ["image-search", fifo, "--image-index", tmp_path / "idx"]):
        p = subprocess.run([sys.executable, "-m", "mars_cli", *map(str, args)], capture_output=True, text=True, timeout=60)
        if args[0] == "index":
            assert p.returncode == 0, p.stderr
            continue
        assert p.returncode == 1 and p.stderr.splitlines()[0] == f"mars {args[0]}: {fifo}: not a regular file"


def test_s1_image_file_size_is_bounded(tmp_path, monkeypatch):
    from mars_cli import images

    path = _img(tmp_path / "a.png")
    monkeypatch.setenv("MARS_MAX_IMAGE_BYTES", "50")
    with pytest.raises(MarsError, match="over the image file limit"):
        images.load_array(path)


def test_s1_an_image_read_allocates_the_file_not_the_bound(tmp_path):
    """Reading an image sized its buffer by the 1 GiB bound: 1 GiB per image, cheap only
    while the kernel overcommits."""
    import tracemalloc

    from mars_cli import images

    path = Path(_img(tmp_path / "a.png"))
    tracemalloc.start()
    try:
        data = images._read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data == path.read_bytes()
    assert peak < 10 * len(data) + (1 << 16), peak


def test_s1_a_file_that_grows_while_read_stays_bounded(tmp_path, monkeypatch):
    from mars_cli import images

    path = tmp_path / "grows.bin"
    path.write_bytes(b"x" * 5000)
    real_fstat = os.fstat
    monkeypatch.setattr(images.os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 100, *real_fstat(fd)[7:])))
    with open(path, "rb") as f:
        assert images._read_bounded(f, 4000) == b"x" * 4001  # over the bound: refused by the caller
    with open(path, "rb") as f:
        assert images._read_bounded(f, 1 << 20) == b"x" * 5000


def test_s1_mars_crop_runs_under_a_virtual_memory_limit(tmp_path):
    """`ulimit -v`, as batch schedulers set it: a read sized by the bound was a MemoryError."""
    import resource

    src = tmp_path / "a.jpg"
    Image.new("RGB", (64, 48), "white").save(src)
    limit = 2 << 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    p = subprocess.run([sys.executable, "-m", "mars_cli", "crop", str(src), "0.1", "0.1", "0.9", "0.9",
                        "-o", str(tmp_path / "c.jpg")], capture_output=True, text=True, timeout=120,
                       preexec_fn=cap, env={**os.environ, "MARS_MAX_IMAGE_BYTES": str(4 << 30)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert Image.open(tmp_path / "c.jpg").size == (52, 40)


def test_s2_openai_engine_sends_only_real_images(tmp_path):
    from mars_cli.engines.openai_engine import data_url

    with pytest.raises(MarsError, match="not an image"):
        data_url("/etc/passwd")
    with pytest.raises(MarsError, match="not a regular file"):
        data_url("/dev/zero")
    png = tmp_path / "photo.jpg"  # a PNG misnamed .jpg is sent as what it is
    Image.new("RGB", (8, 8)).save(png, "PNG")
    assert data_url(str(png)).startswith("data:image/png;base64,")


def test_s4_judge_and_show_thumbnails_use_mars_pixel_limit_not_pillows(tmp_path):
    from mars_cli.eval.show import ImageLinks
    from mars_cli.rl import llm_judge

    big = tmp_path / "big.jpg"
    Image.new("L", (14_000, 14_000)).save(big, quality=50)  # 196 MP: over Pillow's bomb limit, under mars's 200 MP
    url = llm_judge.image_data_url(str(big))
    im = Image.open(__import__("io").BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert im.size == (llm_judge.JUDGE_IMAGE_SIDE, llm_judge.JUDGE_IMAGE_SIDE)
    links = ImageLinks(tmp_path, embed=True)
    assert links.src(str(big), 256).startswith("data:image/jpeg;base64,")


def test_w5_crop_keeps_file_urls_and_names_http_urls(tmp_path):
    from clirun import Ran

    src = _img(tmp_path / "a.png")
    r = Ran(["crop", f"file://{src}", "0", "0", ".5", ".5", "-o", tmp_path / "c.jpg"])
    assert r.exit_code == 0 and json.loads(r.stdout)["source"] == f"file://{src}"
    r = Ran(["crop", "http://example.com/a.jpg", "0", "0", "1", "1"])
    assert r.exit_code == 1 and "http://example.com/a.jpg: only local image files" in r.stderr


# -- C8, W1: crop of thin boxes ---------------------------------------------------------

def test_w1_zoom_on_a_thin_strip_is_widened_to_what_the_processor_accepts(tmp_path, tiny_policy_dir):
    from mars_cli.models.load import load_image_processor
    from mars_cli.tools.crop import crop_image

    src = _img(tmp_path / "wide.png", size=(10_000, 300))
    r = crop_image(src, (0.0, 0.5, 0.9775, 0.5034), out=tmp_path / "c.jpg")
    w, h = r["size"]
    assert max(w, h) / min(w, h) <= 200 and r["box_px"][2] - r["box_px"][0] == 9775
    load_image_processor(tiny_policy_dir)(images=[Image.open(r["path"])])  # would raise over 200:1
    with pytest.raises(MarsError, match="thinner than 200:1"):
        crop_image(_img(tmp_path / "strip.png", size=(5000, 10)), (0, 0, 1, 1), out=tmp_path / "d.jpg")


def test_c8_min_side_upscale_is_capped_below_jpegs_65500_px(tmp_path):
    from mars_cli.tools.crop import crop_image

    src = _img(tmp_path / "a.png", size=(3000, 300))
    with pytest.raises(MarsError, match="over the 65500-pixel side of JPEG"):
        crop_image(src, (0, 0, 1, 0.02), out=tmp_path / "c.jpg", min_side=700)


# -- S3, W4: the openai engine and the LLM judge --------------------------------------------

def test_s3_base_url_credentials_never_reach_records_or_logs(tmp_path, monkeypatch, caplog):
    import logging

    from helpers_rollout import OpenAIStub, answer
    from mars_cli.engines import GenRequest, Sampling, open_engine

    monkeypatch.delenv("MARS_OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    caplog.set_level(logging.DEBUG)
    with OpenAIStub([answer("1")]) as stub:
        url = stub.url.replace("http://", "http://user:s3cret@")
        eng = open_engine("openai", policy=None, sampling=Sampling(), base_url=url, model="m", timeout=7, max_retries=0)
        [res] = eng.generate([GenRequest(messages=[{"role": "user", "content": "hi"}])])
    assert res.error is None
    assert stub.headers[0]["authorization"] == "Basic " + base64.b64encode(b"user:s3cret").decode()
    assert "s3cret" not in json.dumps(eng.describe()) and "s3cret" not in caplog.text
    assert (eng.timeout, eng.max_retries) == (7, 0)


def test_w4_llm_judge_reply_size_is_bounded(monkeypatch):
    from fakeservers import FakeServer, openai_routes
    from mars_cli.rl import llm_judge

    monkeypatch.setattr(llm_judge, "MAX_REPLY_BYTES", 10_000)
    with FakeServer(openai_routes(lambda p: "<verdict>yes</verdict>" + "x" * 50_000)) as srv:
        import asyncio

        async def go():
            out = []
            for rubric in ("strict", "sensenova"):
                async with llm_judge.AsyncJudge(srv.url + "/v1", "m", rubric=rubric, concurrency=1, retries=0,
                                                timeout=10) as j:
                    out.append(await j.judge("q", ["a"], "a"))
            return out

        strict, official = asyncio.run(go())
    # The oversized reply is a failed call under either rubric: strict leaves the record
    # unjudged, the official rubric scores a failed call 0 (and the health check counts it).
    assert strict.accuracy is None and "over 10000 bytes" in strict.error
    assert official.failed == 1 and official.accuracy == 0.0 and "over 10000 bytes" in official.error


def test_w4_summarizer_failure_falls_back_to_plain_results():
    from mars_cli.errors import ToolError
    from mars_cli.tools.text_search import TextSearch

    class Backend:
        name, params = "fake", {}

        def search(self, q, k):
            return [{"rank": 1, "title": "T", "text": "the text"}]

    class Broken:
        params = {}

        def summarize(self, q, results):
            raise ToolError("summarizer: timed out after 2s")

    assert TextSearch(Backend(), summarizer=Broken()).search("q") == [{"rank": 1, "title": "T", "text": "the text"}]


def test_w4_summarizer_honours_the_search_timeout():
    from mars_cli.tools.text_search import open_text_search

    ts = open_text_search("searxng", searxng_url="http://127.0.0.1:9", summarize=True, llm_base_url="http://127.0.0.1:9",
                          llm_model="m", timeout=3.5)
    assert ts.summarizer.http.timeout == 3.5


# -- C2: the page fetcher imports ---------------------------------------------------------

def test_c2_page_fetcher_imports_trafilatura_with_lxml6():
    import trafilatura  # noqa: F401  (fails without lxml_html_clean on lxml 6)

    from mars_cli.tools.web import html_to_text

    page = "<html><body><nav>menu</nav><article><p>" + "The mill stands in Krestaldil. " * 5 + "</p></article></body></html>"
    assert "Krestaldil" in html_to_text(page)


def test_c2_without_trafilatura_pages_fall_back_to_plain_text(monkeypatch, capsys):
    import sys

    from mars_cli.tools import web

    monkeypatch.setitem(sys.modules, "trafilatura", None)
    monkeypatch.setattr(web, "_NO_EXTRACTOR", [])
    assert web.html_to_text("<html><body><p>plain words</p><script>x()</script></body></html>") == "plain words"
    assert "lxml_html_clean" in capsys.readouterr().err


def test_s3_judge_and_summarizer_urls_carry_no_credentials(monkeypatch):
    from mars_cli.rl.llm_judge import AsyncJudge
    from mars_cli.tools.summarize import Summarizer
    from mars_cli.urls import public_url

    for var in ("MARS_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    basic = "Basic " + base64.b64encode(b"u:pw").decode()
    j = AsyncJudge("http://u:pw@127.0.0.1:9/v1", "m")
    assert "pw" not in j.url and j._headers == {"Authorization": basic}
    s = Summarizer("http://u:pw@127.0.0.1:9/v1", "m")
    assert "pw" not in s.base_url and "pw" not in json.dumps(s.params)
    assert public_url("https://h/x?api_key=abc&q=1") == "https://h/x?api_key=***&q=1"
