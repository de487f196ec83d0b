"""`mars data synth`: determinism, the target and its crop, the reference trajectories, splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mars_cli import protocol as P
from mars_cli.eval.synth import make_synth, padded_bbox
from mars_cli.jsonl import read_file
from mars_cli.main import app
from mars_cli.records import validate
from mars_cli.rl.scorers import RULE_SCORERS


@pytest.fixture(autouse=True)
def plain_errors(monkeypatch):
    import typer.core

    monkeypatch.setattr(typer.core, "HAS_RICH", False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "bench"
    r = CliRunner().invoke(app, ["data", "synth", "--tasks", "10", "--seed", "3", "--out", str(out), "--test-fraction", "0.4"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["tasks"] == 10 and summary["types"] == {"crop+search": 6, "perception": 2, "search": 2}
    return out


def test_files_and_task_kinds(synth):
    tasks = read_file(synth / "tasks.jsonl")
    assert [t["meta"]["type"] for t in tasks[:5]] == ["crop+search"] * 3 + ["perception", "search"]
    for t in tasks:
        validate(t, "task")
        assert t["benchmark"] == "synth"
        if t["meta"]["type"] == "search":
            assert t["images"] == [] and t["meta"]["attribute"] in ("year", "founder", "city")
            continue
        assert len(t["images"]) == 1 and Path(t["images"][0]).is_file()
        with Image.open(t["images"][0]) as im:
            assert im.size == (3840, 2160) and im.format == "JPEG"
        l, tp, r, b = t["meta"]["target_box_px"]
        assert 0 <= l < r <= 3840 and 0 <= tp < b <= 2160
        assert (r - l) * (b - tp) < 0.05 * 3840 * 2160
        if t["meta"]["type"] == "perception":
            assert t["scorer"] == "mcq" and len(t["choices"]) == 4
            assert t["choices"]["ABCD".index(t["answers"][0])] == t["meta"]["target_label"]
        else:
            assert t["scorer"] == "em"


def test_target_is_the_yellow_plate(synth):
    t = read_file(synth / "tasks.jsonl")[0]
    arr = np.asarray(Image.open(t["images"][0]).convert("RGB")).astype(int)
    l, tp, r, b = t["meta"]["target_box_px"]
    plate = arr[tp + 4:b - 4, l + 4:r - 4]
    yellow = (plate[..., 0] > 200) & (plate[..., 1] > 170) & (plate[..., 2] < 110)
    assert yellow.mean() > 0.5
    # Dark text on it: the label is drawn, not only the plate.
    assert (plate.sum(-1) < 200).mean() > 0.03


def test_corpus_is_ready_for_indexing_and_holds_the_answers(synth):
    corpus = read_file(synth / "corpus.jsonl")
    assert len({c["id"] for c in corpus}) == len(corpus)
    assert all(set(c) >= {"id", "title", "text"} for c in corpus)
    by_title = {c["title"]: c for c in corpus}
    for t in read_file(synth / "tasks.jsonl"):
        if t["meta"]["type"] == "crop+search":
            assert t["answers"][0] in by_title[t["meta"]["target_label"]]["text"]
            assert t["meta"]["target_label"] not in t["question"]


def test_reference_trajectories_follow_the_protocol(synth):
    tasks = {t["id"]: t for t in read_file(synth / "tasks.jsonl")}
    refs = read_file(synth / "reference.jsonl")
    assert [r["id"] for r in refs] == list(tasks)
    for ref in refs:
        validate(ref, "trajectory")
        task = tasks[ref["id"]]
        assert ref["group"] == ref["id"] and ref["sample"] == 0 and ref["finish"] == "answer"
        assert ref["tokens"] is None and ref["policy"] == {"engine": "reference"}
        assert ref["messages"][:2] == P.initial_messages(task)
        turns = [P.parse_turn(m["content"]) for m in ref["messages"] if m["role"] == "assistant"]
        calls = [(t.call.name, t.call.arguments) for t in turns if t.call]
        assert all(t.error is None for t in turns)
        assert calls == [(c["name"], c["arguments"]) for c in ref["tool_calls"]]
        assert turns[-1].answer == ref["prediction"]
        score = RULE_SCORERS[task["scorer"]](ref["prediction"], task["answers"], task.get("choices"))
        assert score.accuracy == 1.0
        kind = task["meta"]["type"]
        names = [c[0] for c in calls]
        assert names == {"crop+search": [P.ZOOM, P.TEXT_SEARCH], "perception": [P.ZOOM], "search": [P.TEXT_SEARCH]}[kind]
        if P.ZOOM in names:
            bbox = calls[0][1]["bbox_2d"]
            l, t, r, b = task["meta"]["target_box_px"]
            # The zoom covers the whole plate, with some margin, and little else.
            x0, y0, x1, y1 = P.bbox_to_unit(bbox)
            assert x0 * 3840 < l and y0 * 2160 < t and x1 * 3840 > r and y1 * 2160 > b
            assert (x1 - x0) * (y1 - y0) < 0.1
            tool = ref["messages"][3]
            assert tool["role"] == "tool" and tool["name"] == P.ZOOM
            assert tool["content"][0] == {"type": "text", "text": P.ZOOM_HEADER}
            crop = Path(tool["content"][1]["image"])
            assert crop.parent == synth / "artifacts" and crop.is_file()
        if P.TEXT_SEARCH in names:
            result = ref["messages"][-2]
            assert result["name"] == P.TEXT_SEARCH and task["answers"][0] in result["content"][0]["text"]


def test_splits_partition_the_tasks(synth):
    all_ids = [t["id"] for t in read_file(synth / "tasks.jsonl")]
    train = [t["id"] for t in read_file(synth / "train" / "tasks.jsonl")]
    test = [t["id"] for t in read_file(synth / "test" / "tasks.jsonl")]
    assert train and test and sorted(train + test) == sorted(all_ids) and not set(train) & set(test)
    assert [r["id"] for r in read_file(synth / "test" / "reference.jsonl")] == test


def test_same_seed_same_files_and_prefix_stability(tmp_path):
    a = make_synth(tmp_path / "a", n=4, seed=11, workers=1)
    b = make_synth(tmp_path / "b", n=4, seed=11, workers=2)
    c = make_synth(tmp_path / "c", n=2, seed=12, workers=1)
    assert a["tasks"] == b["tasks"] == 4 and c["tasks"] == 2

    def text(d, name):
        return (d / name).read_text().replace(str(d), "DIR")

    for name in ("tasks.jsonl", "reference.jsonl"):
        assert text(tmp_path / "a", name) == text(tmp_path / "b", name)
    for img in (tmp_path / "a" / "images").iterdir():
        assert img.read_bytes() == (tmp_path / "b" / "images" / img.name).read_bytes()
    assert text(tmp_path / "a", "tasks.jsonl") != text(tmp_path / "c", "tasks.jsonl")
    # Task i depends only on (seed, i): a shorter run is a prefix of a longer one.
    d = make_synth(tmp_path / "d", n=2, seed=11, workers=1)
    assert d["tasks"] == 2
    assert text(tmp_path / "a", "tasks.jsonl").splitlines()[:2] == text(tmp_path / "d", "tasks.jsonl").splitlines()


def test_padded_bbox_units():
    assert padded_bbox([100, 100, 200, 150], (1000, 1000), pad=0.0, grid=1) == [76, 76, 224, 174]
    # snapped outward to the grid: the box still covers the plate
    assert padded_bbox([100, 100, 200, 150], (1000, 1000), pad=0.0) == [50, 50, 250, 200]
    assert padded_bbox([0, 0, 1000, 1000], (1000, 1000)) == [0, 0, 1000, 1000]


def test_box_grid_gives_coarse_boxes_that_still_cover_the_plate(tmp_path):
    out = tmp_path / "coarse"
    r = CliRunner().invoke(app, ["data", "synth", "--tasks", "4", "--seed", "3", "--box-grid", "250", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    tasks = {t["id"]: t for t in read_file(out / "tasks.jsonl")}
    zooms = [(ref["id"], c["arguments"]["bbox_2d"]) for ref in read_file(out / "reference.jsonl")
             for c in ref["tool_calls"] if c["name"] == P.ZOOM]
    assert zooms
    for task_id, bbox in zooms:
        assert all(v % 250 == 0 for v in bbox)
        l, t, r_, b = tasks[task_id]["meta"]["target_box_px"]
        x0, y0, x1, y1 = P.bbox_to_unit(bbox)
        assert x0 * 3840 <= l and y0 * 2160 <= t and x1 * 3840 >= r_ and y1 * 2160 >= b
    bad = CliRunner().invoke(app, ["data", "synth", "--tasks", "1", "--box-grid", "0", "--out", str(tmp_path / "z")])
    assert bad.exit_code == 2 and "--box-grid" in bad.stderr and not (tmp_path / "z").exists()


def test_bad_arguments(tmp_path):
    r = CliRunner().invoke(app, ["data", "synth", "--tasks", "0", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2
    with pytest.raises(Exception, match="test-fraction"):
        make_synth(tmp_path / "y", n=1, test_fraction=1.5)
    assert not (tmp_path / "y").exists()


def test_the_local_text_index_finds_the_gold_passage_by_name(synth, tmp_path):
    from mars_cli.tools.index_text import build_text_index, parse_passage
    from mars_cli.tools.text_search import open_text_search

    corpus = read_file(synth / "corpus.jsonl")
    build_text_index((parse_passage(c, None) for c in corpus), tmp_path / "idx")
    ts = open_text_search("local", index=str(tmp_path / "idx"))
    for t in read_file(synth / "tasks.jsonl"):
        if t["meta"]["type"] != "crop+search":
            continue
        hits = ts.search(t["meta"]["target_label"], k=3)
        assert hits[0]["title"] == t["meta"]["target_label"]
        assert t["answers"][0] in hits[0]["text"]


def test_reference_tool_call_turns_count_from_one(synth):
    ref = read_file(synth / "reference.jsonl")[0]
    assert [c["turn"] for c in ref["tool_calls"]] == [1, 2]


def test_kinds_weight_the_rotation_and_search_tasks_need_no_image(tmp_path):
    out = tmp_path / "k"
    r = CliRunner().invoke(app, ["data", "synth", "--tasks", "8", "--seed", "2", "--kinds", "search=3,crop+search", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["types"] == {"search": 6, "crop+search": 2} and summary["images"] == 2
    tasks = read_file(out / "tasks.jsonl")
    assert [t["meta"]["type"] for t in tasks] == (["search"] * 3 + ["crop+search"]) * 2
    for t, ref in zip(tasks, read_file(out / "reference.jsonl")):
        if t["meta"]["type"] == "search":
            # the query is copied from the question, the answer from the first result
            call = ref["tool_calls"][0]
            assert not t["images"] and call["name"] == P.TEXT_SEARCH and call["arguments"]["query"] in t["question"]
            result = ref["messages"][3]["content"][0]["text"]
            assert t["answers"][0] in result.split("[2]")[0] and ref["prediction"] == t["answers"][0]
    for bad in ("search=x", "reading=2", "search=0", "search,search"):
        r = CliRunner().invoke(app, ["data", "synth", "--tasks", "2", "--kinds", bad, "--out", str(tmp_path / "z")])
        assert r.exit_code == 2 and "--kinds" in r.stderr and not (tmp_path / "z").exists(), bad


def test_val_split_leaves_the_test_split_unchanged(tmp_path):
    a = make_synth(tmp_path / "a", n=30, seed=5, test_fraction=0.2, kinds="search")
    b = make_synth(tmp_path / "b", n=30, seed=5, test_fraction=0.2, val_fraction=0.3, kinds="search")
    assert a["val"] == 0 and b["val"] > 0 and a["test"] == b["test"] > 0
    ids = {s: [t["id"] for t in read_file(tmp_path / "b" / s / "tasks.jsonl")] for s in ("train", "val", "test")}
    assert ids["test"] == [t["id"] for t in read_file(tmp_path / "a" / "test" / "tasks.jsonl")]
    assert sorted(sum(ids.values(), [])) == sorted(t["id"] for t in read_file(tmp_path / "b" / "tasks.jsonl"))
    assert not set(ids["val"]) & set(ids["train"]) and not (tmp_path / "a" / "val").exists()
    with pytest.raises(Exception, match="val-fraction"):
        make_synth(tmp_path / "c", n=4, test_fraction=0.5, val_fraction=0.5)


def test_references_are_written_in_the_chosen_protocol(tmp_path):
    make_synth(tmp_path / "m", n=5, seed=1, kinds="search", protocol="mars")
    make_synth(tmp_path / "s", n=5, seed=1, kinds="search")
    mars = read_file(tmp_path / "m" / "reference.jsonl")[0]["messages"][0]["content"]
    default = read_file(tmp_path / "s" / "reference.jsonl")[0]["messages"][0]["content"]
    assert mars == P.build_system_prompt(profile="mars")
    assert default == P.build_system_prompt(profile=P.DEFAULT_PROFILE) and default != mars
    r = CliRunner().invoke(app, ["data", "synth", "--tasks", "1", "--protocol", "nope", "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "--protocol" in r.stderr


def _names(tasks):
    import re

    return [re.search(r"(?:is|was|founded) (.+?), an? ", t["question"]).group(1) for t in tasks]


def test_word_names_come_from_the_lists_and_every_asked_name_has_one_passage(tmp_path):
    from mars_cli.eval import synth as S

    summary = make_synth(tmp_path / "w", n=300, seed=5, kinds="search", names="words", distractors=1)
    tasks = read_file(tmp_path / "w" / "tasks.jsonl")
    corpus = read_file(tmp_path / "w" / "corpus.jsonl")
    names = _names(tasks)
    assert len(set(names)) == len(names) == summary["tasks"]
    for name in names:
        first, place = name.split()
        assert first in S._NAME_WORDS and place in S._WORD_PLACES
    titles = [c["title"] for c in corpus]
    assert all(titles.count(n) == 1 for n in names)  # a namesake or a distractor never takes an asked name
    for t in tasks:
        a = t["answers"][0]
        attr = t["meta"]["attribute"]
        if attr == "city":
            assert a in S._CITY_WORDS
        elif attr == "founder":
            assert a.split()[0] in S._FIRST_NAMES and a.split()[1] in S._SURNAMES


def test_word_names_refuse_more_tasks_than_the_lists_name(tmp_path):
    r = CliRunner().invoke(app, ["data", "synth", "-o", str(tmp_path / "w"), "--tasks", "1711", "--names", "words"])
    assert r.exit_code != 0 and "at most 1710 tasks" in r.stderr
    assert not (tmp_path / "w").exists()
    r = CliRunner().invoke(app, ["data", "synth", "-o", str(tmp_path / "w"), "--names", "latin"])
    assert r.exit_code == 2 and "--names" in r.stderr


def test_default_names_are_unchanged_by_the_word_option(tmp_path):
    # made-up names draw exactly as before: the first task of seed 0 is the one the README shows
    make_synth(tmp_path / "m", n=2, seed=0, kinds="search")
    assert read_file(tmp_path / "m" / "tasks.jsonl")[1]["question"] == "In which city is Steasmountrea Quay, a observatory?"


@pytest.mark.parametrize("k", [1, 3])
def test_search_k_references_show_what_rollout_s_search_returns(tmp_path, k):
    from mars_cli.tools.index_text import build_text_index, parse_passage
    from mars_cli.tools.text_search import open_text_search, render_text_results

    prompt = "Answer by searching."
    r = CliRunner().invoke(app, ["data", "synth", "-o", str(tmp_path / "s"), "--tasks", "12", "--kinds", "search",
                                 "--names", "words", "--search-k", str(k), "--protocol", "mars", "--system-prompt", prompt])
    assert r.exit_code == 0, r.stderr
    build_text_index((parse_passage(c, None) for c in read_file(tmp_path / "s" / "corpus.jsonl")), tmp_path / "idx")
    ts = open_text_search("local", index=str(tmp_path / "idx"))
    for ref in read_file(tmp_path / "s" / "reference.jsonl"):
        assert ref["messages"][0] == {"role": "system", "content": prompt}
        query = ref["tool_calls"][0]["arguments"]["query"]
        shown = ref["messages"][3]["content"][0]["text"]
        assert shown == render_text_results(query, ts.search(query, k=k))
        assert 1 <= shown.count("\n[") <= k and f"(doc {ref['id']}-entity)" in shown.splitlines()[1]
        assert validate(ref, "trajectory", None)


def test_vague_references_search_by_kind_and_answer_from_what_they_find(tmp_path):
    from mars_cli.tools.index_text import build_text_index, parse_passage
    from mars_cli.tools.text_search import open_text_search, render_text_results

    make_synth(tmp_path / "a", n=200, seed=2, kinds="search", names="words", search_k=1, distractors=0)
    make_synth(tmp_path / "b", n=200, seed=2, kinds="search", names="words", search_k=1, distractors=0, vague_fraction=0.5)
    assert (tmp_path / "a" / "tasks.jsonl").read_bytes() == (tmp_path / "b" / "tasks.jsonl").read_bytes()
    build_text_index((parse_passage(c, None) for c in read_file(tmp_path / "b" / "corpus.jsonl")), tmp_path / "idx")
    ts = open_text_search("local", index=str(tmp_path / "idx"))
    passages = {c["id"]: c for c in read_file(tmp_path / "b" / "corpus.jsonl")}
    refs = read_file(tmp_path / "b" / "reference.jsonl")
    vague = [r for r in refs if r["meta"].get("reference") == "vague"]
    assert 70 <= len(vague) <= 130
    wrong = 0
    for r in vague:
        query = r["tool_calls"][0]["arguments"]["query"]
        assert query.split()[0] in ("lighthouse", "observatory", "brewery", "bridge", "museum", "ferry", "library", "mill")
        hits = ts.search(query, k=1)
        assert r["messages"][3]["content"][0]["text"] == render_text_results(query, hits)
        # the answer is read off the passage found, whichever place that is
        assert r["prediction"] in passages[hits[0]["doc_id"]]["text"]
        assert P.parse_turn(r["messages"][4]["content"]).answer == r["prediction"]
        wrong += r["prediction"] != r["answers"][0]
        assert validate(r, "trajectory", None)
    assert wrong > len(vague) // 2  # a vague query mostly finds another place
    exact = [r for r in refs if r["meta"].get("reference") != "vague"]
    assert all(r["prediction"] == r["answers"][0] for r in exact)
    with pytest.raises(Exception, match="needs --search-k"):
        make_synth(tmp_path / "c", n=2, vague_fraction=0.5)


def test_attributes_choose_the_facts_questions_ask_for(tmp_path):
    make_synth(tmp_path / "a", n=30, seed=1, kinds="search", attributes="city,founder")
    asked = {t["meta"]["attribute"] for t in read_file(tmp_path / "a" / "tasks.jsonl")}
    assert asked == {"city", "founder"}
    r = CliRunner().invoke(app, ["data", "synth", "-o", str(tmp_path / "b"), "--attributes", "city,colour"])
    assert r.exit_code == 2 and "'colour'" in r.stderr and not (tmp_path / "b").exists()


def test_word_names_at_capacity_still_give_every_namesake_a_free_name(tmp_path):
    from mars_cli.eval import synth as S

    n = S._Namer("words").capacity * 3 // 4
    make_synth(tmp_path / "full", n=n, seed=0, kinds="search", names="words", distractors=0)
    tasks = read_file(tmp_path / "full" / "tasks.jsonl")
    titles = [c["title"] for c in read_file(tmp_path / "full" / "corpus.jsonl")]
    assert len(tasks) == n and all(titles.count(name) == 1 for name in _names(tasks))
