"""`mars data convert`: one small file per published format, built here, converted and checked."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from mars_cli.errors import MarsError
from mars_cli.eval.convert import convert
from mars_cli.jsonl import read_file
from mars_cli.main import app


@pytest.fixture(autouse=True)
def plain_errors(monkeypatch):
    # Under CliRunner typer draws errors in a rich box; `mars` itself prints `mars data: …`.
    import typer.core

    monkeypatch.setattr(typer.core, "HAS_RICH", False)


def jpeg(color=(200, 10, 10), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def png(color=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return buf.getvalue()


def run(*args):
    r = CliRunner().invoke(app, ["data", "convert", *map(str, args)])
    return r


def tasks_of(out: Path) -> list[dict]:
    return read_file(out / "tasks.jsonl")


def test_hr_mmsearch_parquet_streams_row_groups_and_dedups_images(tmp_path):
    img = jpeg()
    rows = [
        {"sample_id": i, "query": f"q{i}?", "query_image": {"bytes": img if i < 3 else jpeg((0, 0, 255)), "path": None},
         "ground_truth": f"ans{i}", "difficulty": "hard", "category": "sports"}
        for i in range(5)
    ]
    src = tmp_path / "hr.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=2)
    out = tmp_path / "out"
    r = run(src, "--format", "hr-mmsearch", "--out", out)
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["tasks"] == 5 and summary["images"] == 2
    tasks = tasks_of(out)
    assert [t["id"] for t in tasks] == [f"hr-mmsearch-{i}" for i in range(5)]
    t = tasks[0]
    assert t["answers"] == ["ans0"] and t["scorer"] == "llm" and t["benchmark"] == "hr-mmsearch"
    assert t["meta"] == {"sample_id": "0", "difficulty": "hard", "category": "sports"}
    assert Path(t["images"][0]).read_bytes() == img
    assert tasks[1]["images"] == tasks[0]["images"] != tasks[4]["images"]


def test_mmsearch_alternative_answers_and_missing_image(tmp_path):
    rows = [
        {"sample_id": "a", "query": "who?", "query_image": {"bytes": png()}, "gt_answer": "Ann",
         "alternative_gt_answers": ["Anne", "Ann"], "area": "news", "subfield": "x"},
        {"sample_id": "b", "query": "when?", "query_image": None, "gt_answer": "1990",
         "alternative_gt_answers": [], "area": "news", "subfield": "y"},
    ]
    src = tmp_path / "mm.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "o"
    assert run(src, "-f", "mmsearch", "-o", out).exit_code == 0
    a, b = tasks_of(out)
    assert a["answers"] == ["Ann", "Anne"] and a["images"][0].endswith(".png")
    assert b["images"] == [] and b["meta"]["subfield"] == "y"


def test_fvqa_chat_prompt_and_candidates(tmp_path):
    rows = [{
        "prompt": [{"role": "user", "content": "<image>What tower is this?"}],
        "images": [{"bytes": jpeg()}],
        "reward_model": {"ground_truth": "Eiffel Tower", "candidate_answers": json.dumps(["Tour Eiffel"])},
        "category": "landmark",
        "extra_info": {"index": 17},
    }]
    src = tmp_path / "fvqa.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "o"
    assert run(src, "-f", "fvqa", "-o", out).exit_code == 0
    (t,) = tasks_of(out)
    assert t["id"] == "fvqa-17" and t["question"] == "What tower is this?"
    assert t["answers"] == ["Eiffel Tower", "Tour Eiffel"] and t["meta"]["category"] == "landmark"


def test_vstar_folder_shuffles_options_by_seed(tmp_path):
    root = tmp_path / "vstar" / "direct_attributes"
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"sa_{i}.jpg").write_bytes(jpeg((i * 40, 0, 0)))
        (root / f"sa_{i}.json").write_text(json.dumps(
            {"question": "What is the colour of the cup?", "options": ["red", "blue", "green", "white"], "bbox": [[1, 2, 3, 4]]}))
    letters = {}
    for seed in (0, 1):
        out = tmp_path / f"o{seed}"
        assert run(tmp_path / "vstar", "-f", "vstar", "-o", out, "--seed", seed).exit_code == 0
        tasks = tasks_of(out)
        assert len(tasks) == 6
        for t in tasks:
            assert t["scorer"] == "mcq" and t["meta"]["category"] == "direct_attributes"
            assert sorted(t["choices"]) == ["blue", "green", "red", "white"]
            # The gold letter follows "red" wherever the shuffle put it.
            assert t["choices"]["ABCD".index(t["answers"][0])] == "red"
        letters[seed] = [t["answers"][0] for t in tasks]
    assert len(set(letters[0])) > 1, "the source lists the answer first: the order must be shuffled"
    assert letters[0] != letters[1]
    # Same seed, same result.
    assert run(tmp_path / "vstar", "-f", "vstar", "-o", tmp_path / "again").exit_code == 0
    def key(ts):
        return [(t["id"], t["choices"], t["answers"]) for t in ts]

    assert key(tasks_of(tmp_path / "again")) == key(tasks_of(tmp_path / "o0"))


def test_vstar_jsonl_variant_with_label(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    (tmp_path / "q.jsonl").write_text(json.dumps(
        {"question_id": 3, "image": "a.jpg", "text": "Is the cup left of the bag?", "options": ["(A) yes", "(B) no"],
         "label": "B", "category": "relative_position"}) + "\n")
    out = tmp_path / "o"
    assert run(tmp_path / "q.jsonl", "-f", "vstar", "-o", out).exit_code == 0
    (t,) = tasks_of(out)
    assert t["id"] == "vstar-3" and sorted(t["choices"]) == ["no", "yes"]
    assert t["choices"]["AB".index(t["answers"][0])] == "no"


def tsv(path: Path, header: list[str], rows: list[list]) -> None:
    lines = ["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_hr_bench_tsv_base64(tmp_path):
    b64 = base64.b64encode(jpeg()).decode()
    src = tmp_path / "hr_bench_8k.tsv"
    tsv(src, ["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"],
        [[0, "What is on the sign?", "cat", "dog", "fox", "owl", "C", "single", "c1", b64],
         [1, "Which colour?", "red", "blue", "green", "grey", "A", "cross", "c2", b64]])
    out = tmp_path / "o"
    r = run(src, "-f", "hr-bench", "-o", out)
    assert r.exit_code == 0, r.stderr
    a, b = tasks_of(out)
    assert a["id"] == "hr-bench-8k-0" and a["benchmark"] == "hr-bench-8k"
    assert a["choices"] == ["cat", "dog", "fox", "owl"] and a["answers"] == ["C"]
    assert a["meta"] == {"category": "single", "cycle_category": "c1"}
    assert a["images"] == b["images"] and Path(a["images"][0]).read_bytes() == jpeg()


def test_mme_realworld_json_and_tsv(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(png())
    (tmp_path / "mme.json").write_text(json.dumps([{
        "Question_id": "perception/1", "Image": "img/x.png", "Text": "How many cars?",
        "Answer choices": ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) 5"], "Ground truth": "E",
        "Task": "Perception", "Subtask": "Remote sensing", "Category": "count"}]))
    out = tmp_path / "o"
    r = run(tmp_path / "mme.json", "-f", "mme-realworld", "-o", out)
    assert r.exit_code == 0, r.stderr
    (t,) = tasks_of(out)
    assert t["choices"] == ["1", "2", "3", "4", "5"] and t["answers"] == ["E"]
    assert t["meta"]["subtask"] == "Remote sensing"
    src = tmp_path / "mme.tsv"
    tsv(src, ["index", "question", "A", "B", "C", "D", "E", "answer", "category", "image"],
        [[5, "Q?", "a", "b", "c", "d", "e", "D", "ocr", base64.b64encode(jpeg()).decode()]])
    assert run(src, "-f", "mme-realworld", "-o", tmp_path / "o2").exit_code == 0
    (t,) = tasks_of(tmp_path / "o2")
    assert len(t["choices"]) == 5 and t["answers"] == ["D"]


def test_sensenova_manifest_keeps_precomputed_image_search(tmp_path):
    data = tmp_path / "ds"
    (data / "imgs").mkdir(parents=True)
    (data / "imgs" / "q.jpg").write_bytes(jpeg())
    (data / "imgs" / "t1.jpg").write_bytes(jpeg((1, 2, 3)))
    (data / "train.jsonl").write_text(json.dumps({
        "data_source": "mars-train", "prompt": "<image>\nWho built this?", "image": "imgs/q.jpg",
        "reward_model": {"ground_truth": "Gustave Eiffel"}, "extra_info": {"index": 4},
        "image_search_title_list": ["Eiffel Tower - Wikipedia"], "image_search_thumbnail_list": ["imgs/t1.jpg"]}) + "\n")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"train": {"annotation": "ds/train.jsonl", "root": "ds"}}))
    out = tmp_path / "o"
    r = run(manifest, "-f", "sensenova-mars", "-o", out)
    assert r.exit_code == 0, r.stderr
    (t,) = tasks_of(out)
    # a manifest's dataset name names the tasks, "{dataset}-{line index}", as eval.py does
    assert t["id"] == "train-0" and t["question"] == "Who built this?" and t["benchmark"] == "train"
    assert t["image_search_title_list"] == ["Eiffel Tower - Wikipedia"]
    assert Path(t["image_search_thumbnail_list"][0]).read_bytes() == jpeg((1, 2, 3))


def test_bad_row_names_file_and_row_and_leaves_nothing(tmp_path):
    src = tmp_path / "hr.parquet"
    rows = [{"sample_id": 0, "query": "q", "query_image": {"bytes": jpeg()}, "ground_truth": "a"},
            {"sample_id": 1, "query": "q", "query_image": {"bytes": b"not an image"}, "ground_truth": "a"}]
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "o"
    r = run(src, "-f", "hr-mmsearch", "-o", out)
    assert r.exit_code == 1 and r.stdout == ""
    assert f"mars data: {src}:2: row 2: image data is not a JPEG" in r.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["hr.parquet"]


def test_missing_answer_and_unknown_format(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"query": "q", "query_image": "a.jpg"}) + "\n")
    r = run(src, "-f", "hr-mmsearch", "-o", tmp_path / "o")
    assert r.exit_code == 1 and f"{src}:1: row 1: missing 'ground_truth'" in r.stderr
    r = run(src, "-f", "nope", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "unknown --format 'nope'" in r.stderr
    with pytest.raises(MarsError, match="no such file"):
        convert("vstar", [str(tmp_path / "missing")], tmp_path / "o")


def test_limit(tmp_path):
    rows = [{"sample_id": i, "query": "q", "query_image": {"bytes": jpeg()}, "ground_truth": "a"} for i in range(10)]
    src = tmp_path / "hr.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    assert run(src, "-f", "hr-mmsearch", "-o", tmp_path / "o", "--limit", 3).exit_code == 0
    assert len(tasks_of(tmp_path / "o")) == 3


def test_row_failing_the_task_contract_is_located(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"sample_id": 1, "query": "q", "query_image": "a.jpg", "ground_truth": "a"}) + "\n"
                   + json.dumps({"sample_id": 2, "query_image": "a.jpg", "ground_truth": "a"}) + "\n")
    r = run(src, "-f", "hr-mmsearch", "-o", tmp_path / "o")
    assert r.exit_code == 1 and f"{src}:2: row 2: missing 'query' or 'question'" in r.stderr
