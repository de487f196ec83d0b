"""The official reward: the sensenova rubric, judge health, malformed finishes, infra calls."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from test_judge import BAD_CALL, OK_CALL, lines, parse, traj
from test_llm_judge import StubJudge, judge_once

from clirun import Ran
from mars_cli.rl.judge import format_reward
from mars_cli.rl.llm_judge import SENSENOVA_SYSTEM, parse_verdict


def test_the_rubric_is_the_official_thirteen_rules():
    rules = [line for line in SENSENOVA_SYSTEM.splitlines() if line.split(". ", 1)[0].isdigit()]
    assert len(rules) == 13 and rules[-1].startswith("13. Ignore formatting issues")
    assert parse_verdict("<judge> yes </judge><reason>r</reason>", "sensenova") == ("yes", 1.0)
    assert parse_verdict("no tag at all", "sensenova") == ("no", 0.0)  # read as No, never dropped


def test_one_call_per_gold_until_a_yes_with_the_image(tmp_path):
    img = tmp_path / "q.jpg"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(img)
    with StubJudge() as stub:
        v = judge_once(stub, "Who?", ["Barcelona", "Antoni Gaudi", "Sagrada"], "It is antoni gaudi", image=str(img),
                       rubric="sensenova")
        assert (v.accuracy, v.verdict, v.calls, v.failed) == (1.0, "yes", 2, 0)  # stopped at the second gold
        first = stub.calls[0]["body"]["messages"]
        assert first[0]["content"] == SENSENOVA_SYSTEM
        text, image = first[1]["content"]
        assert text["text"].startswith("Image, Question, and Model Response Evaluation\nQuestion: Who?\n"
                                       "Ground Truth Answer: Barcelona\nModel Response: It is antoni gaudi\n")
        data = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
        # resized as eval.py does: at least 65,536 pixels, sides multiples of 32
        assert Image.open(io.BytesIO(data)).size == (320, 224)
        v = judge_once(stub, "Who?", ["x", "y"], "neither", rubric="sensenova")
        assert (v.accuracy, v.calls) == (0.0, 2)


def test_failed_requests_score_zero_and_trip_the_health_check(tmp_path):
    recs = [traj(i, "in Paris") for i in range(4)]
    base = ["judge", "--judge-model", "m", "--retries", "0", "--concurrency", "1"]
    with StubJudge() as stub:
        stub.faults += [500]
        out_file = tmp_path / "judged.jsonl"
        res = Ran(base + ["--judge-base-url", stub.url, "-o", str(out_file)], input=lines(recs))
        assert res.exit_code == 1 and "judge health check failed: 3 of 4" in res.stderr
        assert "below --min-judge-success 0.95" in res.stderr and not out_file.exists()
        stub.faults += [500]
        res = Ran(base + ["--judge-base-url", stub.url, "--min-judge-success", "0.7"], input=lines(recs))
        assert res.exit_code == 0, res.stderr
        out = parse(res.stdout)
        assert out[0]["rewards"]["accuracy"] == 0.0 and "HTTP 500" in out[0]["judge"]["error"]
        assert [r["rewards"]["accuracy"] for r in out[1:]] == [1.0, 1.0, 1.0]
        assert out[1]["judge"]["method"] == "llm:sensenova" and out[1]["judge"]["prompt_version"] == "sensenova-v1"


def test_health_check_needs_an_endpoint():
    res = Ran(["judge", "--min-judge-success", "1.0"], input=lines([traj(0, "Paris"), traj(1, "Lyon")]))
    assert res.exit_code == 0


def test_malformed_episodes_get_reward_zero():
    res = Ran(["judge"], input=lines([traj(0, prediction=None, finish="malformed", tool_calls=[BAD_CALL])]))
    assert res.exit_code == 0, res.stderr
    (rec,) = parse(res.stdout)
    assert rec["reward"] == 0.0 and rec["judge"]["method"] == "malformed"


@pytest.mark.parametrize("call, want", [
    ({**BAD_CALL, "name": "text_search_tool", "error": "serper: HTTP 503", "infra": True}, 1.0),
    ({**BAD_CALL, "name": "image_zoom_in_tool", "error": "img_idx out of range", "infra": False}, 0.0),
    (BAD_CALL, 0.0),
])
def test_format_ignores_infrastructure_failures(call, want):
    assert format_reward(traj(tool_calls=[OK_CALL, call])) == want
