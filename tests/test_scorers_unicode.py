"""Scorers across scripts: NFKC, accent folding, CJK characters as tokens; judge warnings."""

from __future__ import annotations

import json

import pytest

from clirun import Ran
from mars_cli.rl.scorers import empty_golds, exact_match, normalize_answer, rule_judge, substring_match, token_f1


@pytest.mark.parametrize("pred,gold", [
    ("ＵＳＡ", "USA"), ("Sōseki", "Soseki"), ("Natsume Sōseki", "natsume soseki"), ("Łódź", "Lodz"),
    ("Ørsted", "orsted"), ("Straße", "strasse"), ("“Paris.”", "Paris"), ("東京都。", "東京都"), ("①", "1"),
    ("Москва́", "москва"), ("café", "CAFE"), ("北京 市", "北京市"),
])
def test_same_answer_across_forms(pred, gold):
    assert exact_match(pred, [gold]) and token_f1(pred, [gold]) == 1.0


def test_kana_keep_their_voicing_and_other_scripts_are_untouched():
    assert not exact_match("が", ["か"])  # dakuten is not an accent
    assert normalize_answer("한국어 사전") == "한국어 사전"  # Hangul stays word-level
    assert normalize_answer("भारत") == "भारत"  # Devanagari vowel signs are not dropped


def test_cjk_partial_credit():
    assert not exact_match("北京市", ["北京"])
    assert token_f1("北京市", ["北京"]) == pytest.approx(0.8)  # 2 of 3 characters: P 2/3, R 1
    assert substring_match("北京市", ["北京"]) and not substring_match("北京", ["北京市"])
    assert rule_judge("答案是北京市", ["北京"]).accuracy == 1.0
    # a long Chinese gold (7 characters, 3.5 "words") still counts as short for containment
    assert rule_judge("它是中华人民共和国的首都", ["中华人民共和国"]).accuracy == 1.0
    assert token_f1("Tokyo東京", ["東京"]) == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))


def test_empty_golds_are_ignored_not_matched():
    assert empty_golds([" ", ".", "Paris", "A"]) == [" ", "."]
    assert not exact_match("...", ["."]) and token_f1("", ["。"]) == 0.0
    assert exact_match("paris", [".", "Paris"])


def test_an_answer_that_is_only_an_article_keeps_it():
    assert exact_match("A", ["A"]) and exact_match("(a)", ["A"]) and not exact_match("The", ["A"])
    assert not exact_match("", ["A"]) and normalize_answer("the Paris") == "paris"


def rec(i, prediction, answers, scorer="llm"):
    return {"schema_version": 1, "id": f"t{i}", "question": "q", "answers": answers, "scorer": scorer, "group": f"t{i}",
            "sample": 0, "messages": [], "tool_calls": [], "prediction": prediction, "finish": "answer"}


def test_judge_warns_on_fallback_and_empty_golds(tmp_path):
    from mars_cli import streams

    streams._warned_once.clear()
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        rec(0, "It is Paris, France", ["Paris"]), rec(1, "x", [".", "Rome"]), rec(2, "y", ["…"]), rec(3, "z", ["Oslo"])]))
    r = Ran(["judge", f, "--allow-missing"])
    assert r.exit_code == 0, r.stderr
    lines = r.stderr.splitlines()
    assert sum("judged by the official exact-match rule" in ln for ln in lines) == 1  # one line, with its cause
    assert any("no judge endpoint (--judge-base-url or MARS_JUDGE_BASE_URL)" in ln for ln in lines)
    assert f"mars judge: {f}:2: task 't1': gold answer(s) '.' are empty after normalization and are ignored" in lines
    assert f"mars judge: {f}:3: task 't2' has no gold answer: not judged" in lines
    out = [json.loads(x) for x in r.stdout.splitlines()]
    # offline: the official exact match alone (a gold inside a sentence is no match)
    assert [o["rewards"]["accuracy"] for o in out] == [0.0, 0.0, None, 0.0]


def test_unreachable_judge_shows_its_cause(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(rec(0, "Rome", ["Paris"])) + "\n")
    base = ["judge", f, "--judge-base-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "m", "--retries", "0"]
    r = Ran(base + ["--rubric", "strict"])  # a failed call leaves the record unjudged
    assert r.exit_code == 1
    assert "mars judge: could not judge 't0': judge request failed: ConnectError" in r.stderr
    assert "first failure: judge request failed: ConnectError" in r.stderr  # the health check names it too
    r = Ran(base)  # the official rubric scores it 0; the health check fails, naming the cause
    assert r.exit_code == 1
    assert "mars judge: judge request for 't0' failed, scored 0: judge request failed: ConnectError" in r.stderr
    assert "first failure: judge request failed: ConnectError" in r.stderr
