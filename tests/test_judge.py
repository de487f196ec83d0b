"""The judge stage and `mars judge`: rewards, fallback, order, failures, cache, re-judging."""

import subprocess
import sys

import orjson
import pytest
from test_llm_judge import StubJudge
from typer.testing import CliRunner

from mars_cli.jsonl import Where
from mars_cli.main import app
from mars_cli.rl.judge import JudgeConfig, JudgeStats, format_reward, judge_records
from clirun import Ran

runner = CliRunner()



def traj(i=0, prediction="Paris", answers=("Paris",), scorer="llm", finish="answer", tool_calls=None, **kw):
    rec = {"schema_version": 1, "id": f"t{i}", "question": f"Where {i}?", "images": [], "answers": list(answers),
           "choices": None, "benchmark": "test", "scorer": scorer, "meta": {}, "group": f"t{i}", "sample": 0,
           "messages": [], "tool_calls": tool_calls if tool_calls is not None else [], "prediction": prediction,
           "finish": finish, "tokens": {"ids": [1, 2], "mask": [0, 1], "logprobs": [0.0, -0.1]}}
    rec.update(kw)
    return rec


def lines(records):
    return "".join(orjson.dumps(r).decode() + "\n" for r in records)


def parse(out):
    return [orjson.loads(x) for x in out.splitlines() if x.strip()]


OK_CALL = {"turn": 0, "name": "text_search_tool", "arguments": {"query": "x"}, "ok": True, "error": None, "latency": 0.1}
BAD_CALL = {"turn": 1, "name": None, "arguments": None, "ok": False, "error": "bad json", "latency": 0.0}


@pytest.mark.parametrize(
    "rec, want",
    [
        (traj(tool_calls=[OK_CALL]), 1.0),
        (traj(tool_calls=[OK_CALL, BAD_CALL]), 0.0),
        (traj(finish="max_turns"), 0.0),
        (traj(prediction="  "), 0.0),
        (traj(prediction=None, finish="no_action"), 0.0),
    ],
)
def test_format_reward(rec, want):
    assert format_reward(rec) == want


def test_offline_llm_records_use_the_official_exact_match_and_say_so():
    # Offline, llm-scored records get eval.py's exact match (inference/eval.py:504 em_check,
    # OpenSenseNova/SenseNova-MARS @ ce052d7) and nothing more lenient: a gold inside a
    # sentence, or a full-width spelling mars's own normalization would fold, scores 0.
    recs = [traj(0, "paris"), traj(1, "It was taken in Paris."), traj(2, "Lyon"), traj(3, "Ｐａｒｉｓ")]
    res = Ran(["judge"], input=lines(recs))
    assert res.exit_code == 0, res.stderr
    out = parse(res.stdout)
    assert [r["judge"]["method"] for r in out] == ["em-shortcut"] + ["rule-fallback:em"] * 3
    assert [r["rewards"]["accuracy"] for r in out] == [1.0, 0.0, 0.0, 0.0]
    assert [r["reward"] for r in out] == [1.5, 0.5, 0.5, 0.5]
    assert out[0]["tokens"] == recs[0]["tokens"] and list(out[0])[: len(recs[0])] == list(recs[0])
    help_text = " ".join(Ran(["judge", "--help"]).stdout.replace("│", " ").split())
    assert "scored by the official exact-match rule" in help_text


def test_scorers_weights_and_tool_cost():
    recs = [
        traj(0, "B) dog", ["B"], scorer="mcq", choices=["cat", "dog"], tool_calls=[OK_CALL, OK_CALL]),
        traj(1, "red car parked", ["a red car"], scorer="f1"),
        traj(2, "Paris", ["Rome", "paris"], scorer="em", tool_calls=[BAD_CALL]),
    ]
    res = Ran(["judge", "--format-weight", "0.25", "--tool-cost", "0.1"], input=lines(recs))
    out = parse(res.stdout)
    assert out[0]["rewards"] == {"accuracy": 1.0, "format": 1.0, "tool_cost": pytest.approx(0.2)}
    assert out[0]["reward"] == pytest.approx(1.0 + 0.25 - 0.2)
    assert out[0]["judge"]["extracted"] == "B" and out[0]["judge"]["method"].startswith("mcq:")
    assert out[1]["rewards"]["accuracy"] == pytest.approx(0.8) and out[1]["judge"]["verdict"] == "partial"
    assert out[2]["rewards"] == {"accuracy": 1.0, "format": 0.0, "tool_cost": pytest.approx(0.1)}
    # --scorer overrides the records' own scorer
    out = parse(Ran(["judge", "--scorer", "em"], input=lines(recs)).stdout)
    assert [r["judge"]["scorer"] for r in out] == ["em"] * 3 and out[0]["rewards"]["accuracy"] == 0.0


def test_no_gold_is_missing_and_fails_unless_allowed(tmp_path):
    recs = [traj(0), traj(1, answers=())]
    out_file = tmp_path / "out.jsonl"
    res = Ran(["judge", "-o", str(out_file)], input=lines(recs))
    assert res.exit_code == 1 and "1 record(s) could not be judged" in res.stderr
    out = parse(out_file.read_text())  # everything is written before the failing exit
    assert out[1]["rewards"]["accuracy"] is None and out[1]["reward"] is None
    assert "no gold" in out[1]["judge"]["error"]
    assert Ran(["judge", "--allow-missing"], input=lines(recs)).exit_code == 0


def test_bad_record_names_file_and_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(lines([traj(0)]) + '{"id": "x", "question": "q"}\n')
    res = Ran(["judge", str(f)])
    assert res.exit_code == 1 and f"{f}:2: missing field" in res.stderr
    assert Ran(["judge", "--scorer", "bogus"], input="").exit_code == 2


def test_rejudging_replaces_only_the_judges_fields():
    first = parse(Ran(["judge"], input=lines([traj(0, "Lyon")])).stdout)[0]
    first["advantage"] = 0.7
    first["extra"] = {"keep": True}
    again = parse(Ran(["judge", "--scorer", "substring", "--format-weight", "1"], input=lines([first])).stdout)[0]
    assert list(again) == list(first)
    assert again["advantage"] == 0.7 and again["extra"] == {"keep": True}
    assert again["judge"]["scorer"] == "substring" and again["reward"] == 1.0


def test_llm_judge_keeps_input_order_under_concurrency():
    # Slow answers first: with concurrency the fast ones finish first but must wait their turn.
    recs = [traj(i, ("slow " if i % 4 == 0 else "") + ("in Paris" if i % 3 else "Lyon")) for i in range(24)]
    with StubJudge(latency=0.05, slow=0.3) as stub:
        res = Ran(["judge", "--judge-base-url", stub.url, "--rubric", "strict", "--judge-model", "stub", "--max-inflight", "8"],
                  input=lines(recs), env={"MARS_JUDGE_API_KEY": "sk-hidden"})
    assert res.exit_code == 0, res.stderr
    out = parse(res.stdout)
    assert [r["id"] for r in out] == [r["id"] for r in recs]
    assert [r["rewards"]["accuracy"] for r in out] == [float(i % 3 != 0) for i in range(24)]
    j = out[1]["judge"]
    assert (j["model"], j["method"], j["verdict"], j["prompt_version"]) == ("stub", "llm:strict", "yes", "binary-v1")
    assert 2 <= stub.max_in_flight <= 8
    assert all(c["auth"] == "Bearer sk-hidden" for c in stub.calls)
    assert "sk-hidden" not in res.stdout + res.stderr


def test_em_short_circuits_and_simpleqa_scorer_uses_its_rubric():
    recs = [traj(0, "Paris"), traj(1, "I don't know", scorer="simpleqa"), traj(2, None, finish="max_turns")]
    with StubJudge() as stub:
        out = parse(Ran(["judge", "--judge-base-url", stub.url, "--rubric", "strict", "--judge-model", "m"], input=lines(recs)).stdout)
        assert len(stub.calls) == 1
    assert out[0]["judge"]["method"] == "em-shortcut"
    assert (out[1]["judge"]["verdict"], out[1]["judge"]["prompt_version"], out[1]["rewards"]["accuracy"]) == ("not_attempted", "simpleqa-v1", 0.0)
    assert out[2]["judge"]["method"] == "no-answer"


def test_judge_failure_gives_null_and_exit_1_and_cache_reuses_verdicts(tmp_path):
    recs = [traj(0, "in Paris"), traj(1, "in Paris!")]
    args = ["judge", "--judge-model", "m", "--retries", "0", "--cache", str(tmp_path / "cache")]
    with StubJudge() as stub:
        stub.faults += [500]
        res = Ran(args + ["--judge-base-url", stub.url, "--rubric", "strict", "--max-inflight", "1"], input=lines(recs))
        assert res.exit_code == 1
        out = parse(res.stdout)
        assert out[0]["rewards"]["accuracy"] is None and out[0]["reward"] is None
        assert "HTTP 500" in out[0]["judge"]["error"] and out[1]["rewards"]["accuracy"] == 1.0
        res = Ran(args + ["--judge-base-url", stub.url, "--rubric", "strict"], input=lines(recs))
        assert res.exit_code == 0 and len(stub.calls) == 3  # only the failed one was asked again
        out = parse(res.stdout)
        assert out[1]["judge"]["cached"] is True and out[0]["judge"]["cached"] is False


def test_bad_line_with_an_endpoint_is_reported_in_order(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(lines([traj(0, "in Paris"), traj(1, "in Paris")]) + "{not json\n")
    with StubJudge() as stub:
        res = Ran(["judge", "--judge-base-url", stub.url, "--rubric", "strict", "--judge-model", "m", str(f)])
    assert res.exit_code == 1 and f"{f}:3: invalid JSON" in res.stderr
    assert len(parse(res.stdout)) == 2


def test_skip_bad_warnings_name_the_program_from_the_reader_thread():
    text = lines([traj(0, "in Paris")]) + "{oops\n" + lines([traj(1, "Lyon")])
    with StubJudge() as stub:
        res = Ran(["judge", "--judge-base-url", stub.url, "--rubric", "strict", "--judge-model", "m", "--skip-bad"], input=text)
    assert res.exit_code == 0, res.stderr
    assert "mars judge: <stdin>:2: skipped: invalid JSON" in res.stderr
    assert [r["rewards"]["accuracy"] for r in parse(res.stdout)] == [1.0, 0.0]


def test_judge_image_attaches_the_question_image(tmp_path):
    from PIL import Image

    img = tmp_path / "q.png"
    Image.new("RGB", (64, 32), (0, 128, 0)).save(img)
    recs = [traj(0, "in Paris", images=[str(img)]), traj(1, "in Paris", images=["https://example.org/x.jpg"])]
    with StubJudge() as stub:
        res = Ran(["judge", "--judge-base-url", stub.url, "--rubric", "strict", "--judge-model", "m", "--judge-image"],
                  input=lines(recs))
        urls = [c["body"]["messages"][1]["content"][0]["image_url"]["url"] for c in stub.calls]
    assert res.exit_code == 0, res.stderr
    # the local file goes as a data URL, a remote image by its URL (call order may vary)
    assert sorted(u[:23] for u in urls) == ["data:image/jpeg;base64,", "https://example.org/x.j"]


def test_endpoint_without_model_is_a_usage_error():
    res = Ran(["judge", "--judge-base-url", "http://127.0.0.1:9/v1"], input=lines([traj(0, "x")]))
    assert res.exit_code == 2 and "--judge-model" in res.stderr


def test_stage_yields_records_as_they_arrive():
    # A generator input: the stage must not read ahead of what the window allows.
    seen = []

    def source():
        for i in range(5):
            seen.append(i)
            yield Where("<mem>", i + 1), traj(i, "Paris")

    stats = JudgeStats()
    it = judge_records(source(), JudgeConfig(), stats)
    next(it)
    assert seen == [0]
    assert len(list(it)) == 4 and stats.records == 5


def test_subprocess_pipeline_head_ends_each_stage_with_its_summary():
    recs = [traj(i, "Paris") for i in range(2000)]
    p = subprocess.run(f"{sys.executable} -m mars_cli judge | {sys.executable} -m mars_cli advantage --batch-groups 4 | head -1",
                       shell=True, input=lines(recs).encode(), capture_output=True, timeout=120)
    # each stage's summary line (judge's "done" line when it finished before its reader
    # went), never a traceback
    err = p.stderr.decode().splitlines()
    assert p.returncode == 0 and all(line.startswith("mars judge: 2000 records in ") or line.endswith("; its reader went away")
                                     for line in err), err
    assert any(line.startswith("mars advantage: ") for line in err), err
    assert orjson.loads(p.stdout)["advantage"] == 0.0
