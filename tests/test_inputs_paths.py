"""Paths that work from any directory, benchmark formats told apart, eval that cannot hide a broken run."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from clirun import Ran
from mars_cli.eval.detect import detect, detect_row, wrong_format_message
from mars_cli.jsonl import Where, read_file
from mars_cli.paths import resolve, resolve_record_images


def jpeg(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, "JPEG")
    return buf.getvalue()


FVQA_ROW = {"prompt": [{"role": "user", "content": "<image>What tower?"}], "images": [{"bytes": jpeg()}],
            "reward_model": {"ground_truth": "Eiffel Tower", "candidate_answers": ["Tour Eiffel"]},
            "extra_info": {"index": 3}, "data_source": "fvqa"}


def test_convert_writes_absolute_paths_usable_from_elsewhere(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    pq.write_table(pa.Table.from_pylist([FVQA_ROW]), work / "fvqa.pq")  # .pq is parquet
    monkeypatch.chdir(work)
    r = Ran(["data", "convert", "fvqa.pq", "-o", "bench"])  # relative output folder, --format auto
    assert r.exit_code == 0, r.stderr
    assert "wrote 1 fvqa tasks" in r.stderr
    (task,) = read_file(work / "bench" / "tasks.jsonl")
    assert os.path.isabs(task["images"][0]) and Path(task["images"][0]).is_file()
    assert task["answers"] == ["Eiffel Tower", "Tour Eiffel"]
    assert json.loads(r.stdout)["format"] == "fvqa"


def test_synth_writes_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = Ran(["data", "synth", "--tasks", "2", "-o", "s"])
    assert r.exit_code == 0, r.stderr
    for t in read_file(tmp_path / "s" / "tasks.jsonl"):
        assert all(os.path.isabs(p) and Path(p).is_file() for p in t["images"])


def test_wrong_but_compatible_format_is_refused(tmp_path):
    pq.write_table(pa.Table.from_pylist([FVQA_ROW]), tmp_path / "f.parquet")
    r = Ran(["data", "convert", tmp_path / "f.parquet", "-f", "sensenova-mars", "-o", tmp_path / "o"])
    assert r.exit_code == 2 and not (tmp_path / "o").exists()
    assert f"{tmp_path / 'f.parquet'}:1: column 'reward_model.candidate_answers' holds gold answers" in r.stderr
    assert "use --format fvqa" in r.stderr
    mm = {"query": "who?", "gt_answer": "Ann", "alternative_gt_answers": ["Anne"], "ground_truth": None}
    assert "alternative_gt_answers" in wrong_format_message(mm, "hr-mmsearch")
    assert wrong_format_message(mm, "mmsearch") is None


def test_format_detection_per_format(tmp_path):
    assert detect_row({"query": "q", "query_image": {"bytes": b"x"}, "ground_truth": "a"}) == "hr-mmsearch"
    assert detect_row({"query": "q", "gt_answer": "a", "alternative_gt_answers": []}) == "mmsearch"
    assert detect_row(FVQA_ROW) == "fvqa"
    assert detect_row({"prompt": "q", "image": "a.jpg", "reward_model": {"ground_truth": "x"},
                       "image_search_title_list": ["t"]}) == "sensenova-mars"
    assert detect_row({"options": ["a", "b"], "question": "q", "image": "x.jpg"}) == "vstar"
    assert detect_row({"index": 1, "question": "q", "A": "a", "B": "b", "answer": "A", "cycle_category": "c"}) == "hr-bench"
    assert detect_row({"Question_id": "1", "Text": "q", "Image": "x", "Answer choices": ["a", "b"],
                       "Ground truth": "A"}) == "mme-realworld"
    assert detect_row({"question": "q", "answer": "a"}) is None
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"fvqa": {"annotation": "x.jsonl", "root": "img"}}))
    assert detect(manifest) == "sensenova-mars"
    (tmp_path / "odd.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    r = Ran(["data", "convert", tmp_path / "odd.jsonl", "-o", tmp_path / "o"])
    assert r.exit_code == 1 and "cannot tell the benchmark format from its columns (answer, question); pass --format" in r.stderr


def test_file_type_by_first_bytes(tmp_path):
    from mars_cli.eval.convert import iter_rows

    pq.write_table(pa.Table.from_pylist([{"a": 1}]), tmp_path / "data.bin")
    (tmp_path / "rows.txt").write_text('{"a": 2}\n{"a": 3}\n')
    (tmp_path / "list.txt").write_text('[{"a": 4}]')
    assert [r for _, r in iter_rows(tmp_path / "data.bin")] == [{"a": 1}]
    assert [r for _, r in iter_rows(tmp_path / "rows.txt")] == [{"a": 2}, {"a": 3}]
    assert [r for _, r in iter_rows(tmp_path / "list.txt")] == [{"a": 4}]


def test_relative_paths_resolve_beside_the_record_file(tmp_path, monkeypatch):
    (tmp_path / "bench" / "images").mkdir(parents=True)
    (tmp_path / "bench" / "images" / "a.jpg").write_bytes(jpeg())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    where = Where(str(tmp_path / "bench" / "tasks.jsonl"), 1)
    assert resolve("images/a.jpg", where) == str(tmp_path / "bench" / "images" / "a.jpg")
    assert resolve("images/a.jpg", Where("<stdin>", 1)) == "images/a.jpg"  # stdin: the cwd's business
    assert resolve("images/missing.jpg", where) == "images/missing.jpg"  # errors name the path as given
    assert resolve("https://x/a.jpg", where) == "https://x/a.jpg"
    rec = {"images": ["images/a.jpg"], "messages": [{"role": "user", "content": [{"type": "image", "image": "images/a.jpg"}]}],
           "tokens": {"images": ["images/a.jpg"]}}
    resolve_record_images(rec, where)
    full = str(tmp_path / "bench" / "images" / "a.jpg")
    assert rec["images"] == [full] and rec["messages"][0]["content"][0]["image"] == full and rec["tokens"]["images"] == [full]
    from mars_cli.rl.batching import _resolve_image

    assert _resolve_image("images/a.jpg", where) == full  # update and sft read the same way


def traj(i, acc="absent", finish="answer", error=None):
    rec = {"schema_version": 1, "id": f"t{i}", "question": "q", "benchmark": "b", "group": f"t{i}", "sample": 0,
           "messages": [], "tool_calls": [], "prediction": None if finish == "error" else "x", "finish": finish}
    if error:
        rec["error"] = error
    if acc != "absent":
        rec["rewards"] = {"accuracy": acc, "format": 0.0}
        rec["reward"] = acc
    return rec


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_eval_unjudged_exits_1_and_writes_nothing(tmp_path):
    f = write(tmp_path / "t.jsonl", [traj(0), traj(1, finish="error", error="images/a.jpg: no such file")])
    r = Ran(["eval", f, "-o", tmp_path / "m.jsonl"])
    assert r.exit_code == 1 and not (tmp_path / "m.jsonl").exists()
    assert "mars eval: none of the 2 records carries an accuracy (rewards.accuracy): run them through `mars judge` first; " \
           "1 ended with an error" in r.stderr


def test_eval_error_column_and_warning(tmp_path):
    f = write(tmp_path / "t.jsonl", [traj(0, 1.0), traj(1, 0.0, "error", "images/a.jpg: no such file"),
                                     traj(2, 0.0, "error", "images/a.jpg: no such file")])
    r = Ran(["eval", f])
    assert r.exit_code == 0, r.stderr
    head, row = r.stderr.splitlines()[:2]
    cols = head.split()
    assert cols[:6] == ["benchmark", "subset", "n", "missing", "error", "pass@1"]
    assert row.split()[2:6] == ["3", "0", "2", "33.3"]
    assert 'mars eval: 2 of 3 episodes ended with finish "error": images/a.jpg: no such file' in r.stderr
    m = json.loads(r.stdout)
    assert m["errors"] == 2 and m["first_errors"] == ["images/a.jpg: no such file"]
