"""`mars rollout|ask|prompt|judge --protocol sensenova-eval` end to end, against a scripted
OpenAI-compatible model on 127.0.0.1: what the official inference/eval.py
(OpenSenseNova/SenseNova-MARS @ ce052d7) sends, and how it scores. Expected pixels and
sizes were produced by the official functions on the same photo (test_sensenova_eval.photo).
"""

from __future__ import annotations

import base64
import io
import json

import orjson
import pytest
from PIL import Image
from typer.testing import CliRunner

from clirun import Ran
from helpers_rollout import OpenAIStub as Stub, make_image
from mars_cli import protocol, sensenova
from mars_cli.main import app
from mars_cli.records import make_task
from test_llm_judge import StubJudge
from test_sensenova_eval import digest, photo

pytestmark = pytest.mark.network
EVAL = ["--protocol", "sensenova-eval"]


def task(tid, images, *, answers=("A",), scorer="mcq", system_prompt=sensenova.SYSTEM_PROMPT):
    meta = {"system_prompt": system_prompt} if system_prompt else {}
    return make_task(tid, "Which is it? (A) x (B) y", images=[str(p) for p in images], answers=list(answers),
                     scorer=scorer, meta=meta)


def write_tasks(path, tasks):
    path.write_bytes(b"".join(orjson.dumps(t) + b"\n" for t in tasks))
    return str(path)


def rollout(stub, tasks, out, *extra):
    return CliRunner().invoke(app, ["rollout", tasks, "--engine", "openai", "--model", "m", "--base-url", stub.url,
                                    "-o", str(out), *EVAL, *extra])


def image_of(part) -> Image.Image:
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")  # eval.py:315-323 image_to_base64: PNG
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def think(text):
    return f"<thinking>{text}</thinking>\n"


def test_the_8k_photo_as_eval_py_shows_and_scores_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "k")
    path = tmp_path / "photo8k.bmp"  # lossless, so the pinned digests apply
    Image.fromarray(photo(8064, 5241)).save(path)
    tasks = write_tasks(tmp_path / "tasks.jsonl", [task("t", [path])])
    turns = [think("zoom") + protocol.format_call(protocol.ZOOM, {"bbox_2d": [100, 200, 300, 400], "label": "x",
                                                                  "img_idx": 0}),
             think("other") + protocol.format_call("x_tool", {}),
             think("search") + protocol.format_call(protocol.TEXT_SEARCH, {"query": "what"}),
             "The answer is (A)."]
    out = tmp_path / "traj.jsonl"
    with Stub(turns) as stub:
        r = rollout(stub, tasks, out)
        assert r.exit_code == 0, r.stderr
    from mars_cli import images

    assert images.decode_mode() == "display"  # the profile's "stored" lasted only as long as the command
    first, second, third, fourth = stub.requests
    # eval.py:1424-1427: the first image resized by smart_resize (65,536-8,294,400 px, factor 32)
    sent = image_of(first["messages"][1]["content"][0])
    assert sent.size == (3552, 2304) and digest(sent.convert("RGB")) == "9968804a05a24117"
    assert first["max_tokens"] == 4096  # eval.py:2246
    # eval.py:1486 crops the full-resolution original, 1499-1504 sends it inside the tags
    zoomed = second["messages"][3]
    assert zoomed["role"] == "user" and zoomed["content"][0]["text"] == "<tool_response>\nHere is the zoomed image:"
    crop = image_of(zoomed["content"][1])
    assert crop.size == (1600, 1056) and digest(crop.convert("RGB")) == "97170c12d012c2fe"
    assert zoomed["content"][2]["text"] == "\n</tool_response>"
    # eval.py:1582 and 1531
    assert third["messages"][5] == {"role": "user", "content": "<tool_response>\nError: Unknown tool 'x_tool'.\n</tool_response>"}
    assert fourth["messages"][7] == {"role": "user", "content": "<tool_response>\nError: Search not available.\n</tool_response>"}
    [rec] = [json.loads(x) for x in out.read_text().splitlines()]
    assert rec["protocol"] == "sensenova-eval" and rec["finish"] == "answer"
    assert rec["prediction"] == "The answer is (A)."  # eval.py:529: an untagged reply is the answer
    # eval.py:1703-1706 em_score_mcq: "answer is (A)" (437) is correct for gold A
    res = Ran(["judge"], input=out.read_text())
    assert res.exit_code == 0, res.stderr
    judged = json.loads(res.stdout)
    assert judged["rewards"]["accuracy"] == 1.0 and judged["judge"]["method"] == "eval:mcq"
    assert judged["judge"]["extracted"] == "A"
    # the training-loop profile reads the same reply as no action at all: no prediction, 0
    assert protocol.parse_turn("The answer is (A).").action == "none"


def test_a_model_that_never_answers_stops_at_50_turns(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "k")
    img = make_image(tmp_path / "a.jpg", size=(64, 48))
    tasks = write_tasks(tmp_path / "tasks.jsonl", [task("t", [img])])
    out = tmp_path / "traj.jsonl"
    with Stub([think("again") + protocol.format_call(protocol.TEXT_SEARCH, {"query": "q"})]) as stub:
        r = rollout(stub, tasks, out)
        assert r.exit_code == 0, r.stderr
    [rec] = [json.loads(x) for x in out.read_text().splitlines()]
    # eval.py:2247 --max-turns 50; 1452 the loop runs every turn's call, the 50th too, then 1604 "max_turns"
    assert len(stub.requests) == 50 and rec["finish"] == "max_turns" and rec["turns"] == 50
    assert len(rec["tool_calls"]) == 50 and rec["messages"][-1]["role"] == "tool"
    # mars's training-loop profile stops at 10 turns and does not run the last call
    with Stub([think("again") + protocol.format_call(protocol.TEXT_SEARCH, {"query": "q"})]) as stub:
        r = CliRunner().invoke(app, ["rollout", tasks, "--engine", "openai", "--model", "m", "--base-url", stub.url,
                                     "-o", str(out)])
        assert r.exit_code == 0, r.stderr
    [rec] = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(stub.requests) == 10 and rec["finish"] == "max_turns" and len(rec["tool_calls"]) == 9


def test_first_image_only_system_prompt_required_and_flags_win(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "k")
    a, b = make_image(tmp_path / "a.jpg"), make_image(tmp_path / "b.jpg", color=(0, 0, 200))
    tasks = write_tasks(tmp_path / "tasks.jsonl", [task("two", [a, b]), task("bare", [a], system_prompt=None)])
    out = tmp_path / "traj.jsonl"
    with Stub(["<answer>A</answer>"]) as stub:
        r = rollout(stub, tasks, out, "--max-new-tokens", "99", "--max-error-rate", "1")
        assert r.exit_code == 0, r.stderr
    [req] = stub.requests
    content = req["messages"][1]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"]  # eval.py:711 images[0] only
    assert req["max_tokens"] == 99  # an explicit flag wins over the profile's 4096
    recs = {r["group"]: r for r in (json.loads(x) for x in out.read_text().splitlines())}
    assert recs["two"]["finish"] == "answer"
    assert recs["bare"]["finish"] == "error" and "no dataset system prompt" in recs["bare"]["error"]  # eval.py:1682


def test_prompt_and_ask_take_the_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "k")
    a, b = make_image(tmp_path / "a.jpg"), make_image(tmp_path / "b.jpg")
    tasks = write_tasks(tmp_path / "tasks.jsonl", [task("t", [a, b]), task("bare", [a], system_prompt=None)])
    res = Ran(["prompt", *EVAL, tasks])
    assert res.exit_code == 1 and "tasks.jsonl:2:" in res.stderr and "no dataset system prompt" in res.stderr
    one = write_tasks(tmp_path / "one.jsonl", [task("t", [a, b])])
    res = Ran(["prompt", *EVAL, one])
    rec = json.loads(res.stdout)
    assert rec["protocol"] == "sensenova-eval" and rec["prompt"].count("<|image_pad|>") == 1
    with Stub(["The answer is (A)."]) as stub:
        r = CliRunner().invoke(app, ["ask", a, "Which?", "--engine", "openai", "--model", "m", "--base-url", stub.url,
                                     "--quiet", *EVAL])
        assert r.exit_code == 0, r.stderr
    # an untagged reply is the answer (eval.py:529); 4,096 tokens a turn (eval.py:2246); the
    # official dataset prompt stands in for the dataset a person's question lacks
    assert r.stdout.strip() == "The answer is (A)." and stub.requests[0]["max_tokens"] == 4096
    assert stub.requests[0]["messages"][0]["content"].startswith(sensenova.SYSTEM_PROMPT + "\n\n# Tools")


def test_the_judge_call_is_eval_pys(tmp_path):
    rec = {**task("t", [], answers=["Paris"], scorer="llm"), "group": "t", "sample": 0, "protocol": "sensenova-eval",
           "messages": [{"role": "assistant", "content": "<thinking>x</thinking><answer>Ｐａｒｉｓ</answer>"}],
           "tool_calls": [], "prediction": "Ｐａｒｉｓ", "finish": "answer", "tokens": None}
    line = json.dumps(rec) + "\n"
    with StubJudge() as stub:
        res = Ran(["judge", "--judge-base-url", stub.url, "--judge-model", "j"], input=line)
        assert res.exit_code == 0, res.stderr
        # eval.py:601 em_check folds no Unicode: the judge is asked, with max_tokens 8192 (653)
        assert len(stub.calls) == 1 and stub.calls[0]["body"]["max_tokens"] == 8192
        stub.faults += [500]
        out = tmp_path / "judged.jsonl"
        res = Ran(["judge", "--judge-base-url", stub.url, "--judge-model", "j", "--retries", "0", "-o", str(out)],
                  input=line)
        # eval.py:661-665: a judge call that fails after its retries stops the run
        assert res.exit_code == 1 and "official evaluation stops here" in res.stderr and not out.exists()


def test_judge_protocol_flag_rescores_other_records_as_eval_py(monkeypatch):
    """`mars judge --protocol sensenova-eval` (or MARS_PROTOCOL) scores records rolled out under
    the training profile by eval.py's rules: the untagged final reply is read whole
    (eval.py:529) and "answer is (A)" is correct for gold A (eval.py:1703-1706)."""
    rec = {**task("t", []), "group": "t", "sample": 0, "protocol": "sensenova", "tool_calls": [], "tokens": None,
           "messages": [{"role": "assistant", "content": "The answer is (A)."}], "prediction": None,
           "finish": "no_action"}
    line = json.dumps(rec) + "\n"
    scored = {}
    for how, args, env in (("record", [], None), ("flag", EVAL, None), ("env", [], "sensenova-eval")):
        if env:
            monkeypatch.setenv("MARS_PROTOCOL", env)
        res = Ran(["judge", *args], input=line)
        assert res.exit_code == 0, res.stderr
        scored[how] = json.loads(res.stdout)
    assert scored["record"]["rewards"]["accuracy"] == 0.0  # the training loop: no answer
    for how in ("flag", "env"):
        assert scored[how]["rewards"]["accuracy"] == 1.0 and scored[how]["judge"]["method"] == "eval:mcq", how
    res = Ran(["judge", "--protocol", "nope"], input=line)
    assert res.exit_code == 2 and "nope" in res.stderr
    # a reply holding a call eval.py runs (eval.py:946-955 finds it inside thinking too), or a
    # run cut at the turn limit (eval.py:1586), leaves eval.py no final reply: 0
    call = '<thinking><tool_call>{"name": "x", "arguments": {}}</tool_call></thinking> The answer is (A).'
    for finish, text in (("no_action", call), ("max_turns", "The answer is (A).")):
        other = {**rec, "finish": finish, "messages": [{"role": "assistant", "content": text}]}
        res = Ran(["judge", *EVAL], input=json.dumps(other) + "\n")
        assert res.exit_code == 0 and json.loads(res.stdout)["rewards"]["accuracy"] == 0.0, finish
