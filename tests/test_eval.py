"""`mars eval`: hand-computed metrics, pass@k against brute force, missing rewards, errors."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, strategies as st
from typer.testing import CliRunner

from mars_cli.eval.metrics import compute_metrics, format_table, pass_at_k
from mars_cli.main import app


@pytest.fixture(autouse=True)
def plain_errors(monkeypatch):
    import typer.core

    monkeypatch.setattr(typer.core, "HAS_RICH", False)


def traj(group, sample, acc, *, bench="b1", calls=(), finish="answer", fmt=None, tokens=None, meta=None, turns=1, **extra):
    rec = {
        "id": group, "question": "q?", "benchmark": bench, "meta": meta or {},
        "group": group, "sample": sample,
        "messages": [{"role": "user", "content": "q?"}] + [{"role": "assistant", "content": "x"}] * turns,
        "tool_calls": [{"turn": i, "name": n, "arguments": {}, "ok": ok, "error": None if ok else "bad", "latency": 0.1}
                       for i, (n, ok) in enumerate(calls)],
        "prediction": "p" if finish == "answer" else None, "finish": finish, "tokens": tokens,
    }
    if acc != "absent":
        rewards = {"accuracy": acc}
        if fmt is not None:
            rewards["format"] = fmt
        rec["rewards"] = rewards
        rec["reward"] = None if acc is None else acc + 0.5 * (fmt or 0)
    rec.update(extra)
    return rec


def located(recs):
    return [(f"t.jsonl:{i + 1}", r) for i, r in enumerate(recs)]


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@given(st.lists(st.booleans(), min_size=1, max_size=9), st.integers(1, 9))
def test_pass_at_k_matches_enumerating_subsets(outcomes, k):
    k = min(k, len(outcomes))
    assert pass_at_k(len(outcomes), sum(outcomes), k) == pytest.approx(brute_pass_at_k(outcomes, k))


def test_hand_computed_benchmark_record():
    recs = [
        # task a: 2 of 4 correct; task b: 0 of 4 (one unjudged → missing, a 5th sample keeps n=4)
        traj("a", 0, 1.0, calls=[("image_zoom_in_tool", True), ("text_search_tool", True)], fmt=1.0, turns=3,
             tokens={"ids": [1, 2, 3, 4], "mask": [0, 1, 1, 0], "logprobs": [0, 0, 0, 0]}),
        traj("a", 1, 0.0, calls=[("image_zoom_in_tool", False)], fmt=0.0, turns=2,
             tokens={"ids": [1, 2], "mask": [0, 1], "logprobs": [0, 0]}),
        traj("a", 2, 1.0, fmt=1.0),
        traj("a", 3, 0.0, finish="max_turns", fmt=0.0),
        traj("b", 0, 0.0, fmt=1.0),
        traj("b", 1, None, fmt=1.0),
        traj("b", 2, 0.0, fmt=1.0),
        traj("b", 3, 0.0, fmt=1.0),
        traj("b", 4, "absent"),
        traj("b", 5, 0.0, fmt=1.0),
    ]
    (m,) = compute_metrics(located(recs), label="after-sft")
    assert m["benchmark"] == "b1" and m["label"] == "after-sft" and m["by"] is None
    assert (m["episodes"], m["tasks"], m["judged"], m["missing"]) == (10, 2, 8, 2)
    assert m["pass@1"] == pytest.approx(2 / 8)
    assert m["k"] == 4
    assert m["avg@k"] == pytest.approx((0.5 + 0.0) / 2)
    # task a: 1 - C(2,4)/C(4,4) = 1; task b: 0
    assert m["pass@k"] == pytest.approx(0.5)
    # pass@2 for a: 1 - C(2,2)/C(4,2) = 5/6
    assert m["pass_at"] == {"1": pytest.approx(0.25), "2": pytest.approx(5 / 12), "4": pytest.approx(0.5)}
    # format: rewards.format where given; the unjudged record ended in an answer with no calls → 1
    assert m["format"] == pytest.approx(8 / 10)
    # reward: a 1.5, 0, 1.5, 0 and b 0.5 ×4; the null-accuracy and unjudged records have none
    assert m["reward"] == pytest.approx(5.0 / 8)
    assert m["tool_calls"] == pytest.approx(3 / 10)
    assert m["tool_calls_by_tool"] == {"image_zoom_in_tool": pytest.approx(0.2), "text_search_tool": pytest.approx(0.1)}
    assert m["invalid_call_rate"] == pytest.approx(1 / 3)
    assert m["turns"] == pytest.approx((3 + 2 + 8) / 10)
    assert m["finish"] == {"answer": 9, "max_turns": 1}
    assert (m["tokens_generated"], m["tokens_total"], m["tokens_episodes"]) == (1.5, 3.0, 2)


def test_single_sample_has_no_pass_at_k_and_nothing_judged_is_null():
    (m,) = compute_metrics(located([traj("a", 0, 1.0), traj("b", 0, 0.0)]))
    assert m["k"] == 1 and "pass@k" not in m and m["pass@1"] == 0.5
    (m,) = compute_metrics(located([traj("a", 0, "absent")]))
    assert m["pass@1"] is None and m["missing"] == 1 and m["judged"] == 0
    assert m["invalid_call_rate"] is None and m["tokens_generated"] is None


def test_by_task_and_meta_fields_and_benchmarks():
    recs = [
        traj("a", 0, 1.0, meta={"difficulty": "easy"}, category="sports"),
        traj("b", 0, 0.0, meta={"difficulty": "hard"}, category="sports"),
        traj("c", 0, 1.0, meta={"difficulty": "hard"}),
        traj("d", 0, 1.0, bench="b2"),
    ]
    out = compute_metrics(located(recs), by=["difficulty", "category"])
    keys = [(m["benchmark"], m["by"], m["subset"], m["pass@1"]) for m in out]
    assert keys == [
        ("b1", None, None, pytest.approx(2 / 3)),
        ("b1", "category", "(none)", 1.0),
        ("b1", "category", "sports", 0.5),
        ("b1", "difficulty", "easy", 1.0),
        ("b1", "difficulty", "hard", 0.5),
        ("b2", None, None, 1.0),
        ("b2", "category", "(none)", 1.0),
        ("b2", "difficulty", "(none)", 1.0),
    ]
    table = format_table(out)
    assert "difficulty=hard" in table and table.count("\n") == len(out)


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_cli_records_on_stdout_table_on_stderr(tmp_path):
    f = write(tmp_path / "j.jsonl", [traj("a", s, float(s % 2)) for s in range(4)])
    r = CliRunner().invoke(app, ["eval", f, "--label", "base"])
    assert r.exit_code == 0, r.stderr
    (m,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert m["label"] == "base" and m["pass@1"] == 0.5 and m["pass@k"] == 1.0 and m["schema_version"] == 1
    assert "pass@1" in r.stderr and "50.0" in r.stderr and "base" in r.stderr
    out = tmp_path / "m.jsonl"
    r = CliRunner().invoke(app, ["eval", f, "-o", str(out), "-q"])
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
    assert json.loads(out.read_text())["episodes"] == 4


def test_cli_reads_stdin():
    data = "".join(json.dumps(traj("a", s, 1.0)) + "\n" for s in range(2))
    r = CliRunner().invoke(app, ["eval", "-q"], input=data)
    assert r.exit_code == 0 and json.loads(r.stdout)["pass@1"] == 1.0


@pytest.mark.parametrize("bad, message", [
    ({"finish": "answer"}, "missing field 'group'"),
    ({"rewards": {"accuracy": "yes"}}, "field 'rewards' must be an object of numbers or nulls"),
    ({"finish": "gave up"}, "field 'finish' must be one of"),
])
def test_bad_records_name_file_and_line(tmp_path, bad, message):
    good = traj("a", 0, 1.0)
    broken = {**traj("b", 0, 1.0), **bad}
    if message.startswith("missing field 'group'"):
        broken.pop("group")
    f = write(tmp_path / "j.jsonl", [good, broken])
    r = CliRunner().invoke(app, ["eval", f])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith(f"mars eval: {f}:2: {message}"), r.stderr


def test_duplicate_sample_is_an_error(tmp_path):
    f = write(tmp_path / "j.jsonl", [traj("a", 0, 1.0), traj("a", 0, 0.0)])
    r = CliRunner().invoke(app, ["eval", f])
    assert r.exit_code == 1 and f"{f}:2: duplicate sample 0 of group 'a' (first at {f}:1)" in r.stderr


def test_invalid_json_line(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text(json.dumps(traj("a", 0, 1.0)) + "\n{nope\n")
    r = CliRunner().invoke(app, ["eval", str(p)])
    assert r.exit_code == 1 and f"{p}:2: invalid JSON" in r.stderr
    r = CliRunner().invoke(app, ["eval", str(p), "--skip-bad", "-q"])
    assert r.exit_code == 0 and json.loads(r.stdout)["episodes"] == 1
