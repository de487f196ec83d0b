"""The sensenova profile: the released checkpoints' first prompt, byte for byte.

The expected text is built here from the official rules alone (the manifest's system
prompt, eval.py's tools section around json.dumps of each YAML tool_schema, plain ChatML),
never from mars_cli's own strings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helpers_rollout import make_image
from mars_cli import protocol
from mars_cli.main import app

DATA = Path(__file__).parent / "data"


def official_tools_section() -> str:
    """eval.py's load_tool_config, restated."""
    config = yaml.safe_load((DATA / "sensenova_tools_val.yaml").read_text())
    defs = "\n".join(json.dumps(t["tool_schema"], ensure_ascii=False) for t in config["tools"])
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{defs}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def official_prompt(system_prompt: str, question: str, n_images: int = 1) -> str:
    system = system_prompt + "\n\n" + official_tools_section()
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
            + "<|vision_start|><|image_pad|><|vision_end|>" * n_images
            + f"{question}<|im_end|>\n<|im_start|>assistant\n")


def manifest_system_prompt(name: str = "hr_mmsearch") -> str:
    entry = json.loads((DATA / "sensenova_manifest.json").read_text())[name]
    return entry["input_template"]["arguments"]["system_prompt"]


def write_manifest(tmp_path: Path) -> Path:
    """The fixture manifest with two small datasets laid out as the official data is."""
    man = json.loads((DATA / "sensenova_manifest.json").read_text())
    rows = {
        "hr_mmsearch": [
            {"prompt": [{"role": "user", "content": "<image>\nWho designed  the building in this photo? "}],
             "image": ["a.jpg"], "reward_model": {"ground_truth": ["Gaudí", "Antoni Gaudí"]}},
            {"prompt": [{"role": "user", "content": "<image>What year?"}], "image": ["a.jpg"],
             "reward_model": {"ground_truth": ["1882"]}},
        ],
        "deepeyes_4k_train_mcq": [
            {"prompt": [{"role": "user", "content": "<image>\nWhat colour is the sign?\n(A) red\n(B) blue"}],
             "image": ["a.jpg"], "reward_model": {"ground_truth": ["A"]}},
        ],
    }
    for name, entry in man.items():
        ann = tmp_path / entry["annotation"]
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        make_image(tmp_path / entry["root"] / "a.jpg", size=(120, 90))
    path = tmp_path / "test_manifest.json"
    path.write_text(json.dumps(man))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest")
    manifest = write_manifest(tmp)
    res = CliRunner().invoke(app, ["data", "convert", "--format", "sensenova-mars", str(manifest), "-o", str(tmp / "out")])
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in (tmp / "out" / "tasks.jsonl").read_text().splitlines()]


def test_converter_keeps_the_manifest_settings(converted):
    by_id = {t["id"]: t for t in converted}
    assert sorted(by_id) == ["deepeyes_4k_train_mcq-0", "deepeyes_4k_train_mcq-0~1", "hr_mmsearch-0", "hr_mmsearch-1"]
    hr = by_id["hr_mmsearch-0"]
    # eval.py: replace("<image>", "").strip(), inner spacing untouched
    assert hr["question"] == "Who designed  the building in this photo?"
    assert hr["scorer"] == "llm" and hr["meta"]["score_methods"] == ["llm_score"]
    assert hr["meta"]["system_prompt"] == manifest_system_prompt()
    mcq = by_id["deepeyes_4k_train_mcq-0"]
    assert mcq["scorer"] == "mcq" and mcq["meta"]["system_prompt"] == "#Role\nYou are a careful assistant."
    assert by_id["deepeyes_4k_train_mcq-0~1"]["meta"]["repeat"] == 1


def prompt_of(task: dict, *args: str) -> dict:
    res = CliRunner().invoke(app, ["prompt", *args], input=json.dumps(task) + "\n")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_prompt_is_byte_identical_on_a_converted_manifest_task(converted):
    for task in converted:
        got = prompt_of(task)
        want = official_prompt(task["meta"]["system_prompt"], task["question"])
        assert got["prompt"] == want, task["id"]
        assert got["protocol"] == "sensenova" and len(got["images"]) == 1


def test_prompt_without_a_system_prompt_uses_the_official_one(tmp_path):
    img = make_image(tmp_path / "x.jpg")
    task = {"id": "plain", "question": "  What is written on the sign?", "images": [img], "answers": ["stop"]}
    got = prompt_of(task, "--protocol", "sensenova")
    assert got["prompt"] == official_prompt(manifest_system_prompt(), "What is written on the sign?")
    # every dataset of the official manifests shares that prompt
    assert manifest_system_prompt("hr_mmsearch") == got["prompt"].split("\n", 1)[1].split("\n\n# Tools")[0]


def test_mars_profile_differs_and_policy_template_agrees(tmp_path, tiny_policy_dir):
    img = make_image(tmp_path / "x.jpg")
    task = {"id": "t", "question": "q?", "images": [img], "answers": ["a"]}
    mars = prompt_of(task, "--protocol", "mars")
    assert mars["protocol"] == "mars" and "#Role" not in mars["prompt"] and "<tools>" in mars["prompt"]
    with_policy = prompt_of(task, "--policy", str(tiny_policy_dir))
    assert with_policy["prompt"] == official_prompt(manifest_system_prompt(), "q?")
    assert with_policy["chat_template_equal"] is True
    # 400x300 at 65,536-8,294,400 px: 392x308 on the 28-px grid → 14 × 11 merged patches
    big = prompt_of(task, "--policy", str(tiny_policy_dir), "--min-pixels", "65536", "--max-pixels", "8294400")
    assert big["pixels"] == {"min": 65536, "max": 8294400}
    assert big["input_tokens"] == big["tokens"] - 1 + 14 * 11


def test_unknown_protocol_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(app, ["prompt", "--protocol", "nope"], input="{}\n")
    assert res.exit_code == 2 and "--protocol must be one of sensenova, sensenova-eval, mars" in res.output


def test_profiles_and_their_malformed_policy():
    assert protocol.PROFILES["sensenova"].on_malformed == "end"
    assert protocol.PROFILES["mars"].on_malformed == "observe"
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in protocol.PROFILES["sensenova"].tool_schemas}
    assert schemas["image_zoom_in_tool"]["required"] == ["bbox_2d", "label", "img_idx"]
    assert schemas["image_search_tool"] == {"type": "object", "properties": {}, "required": []}
    bad_json = protocol.parse_turn('<thinking>x</thinking><tool_call>{"name": "image_zoom_in_tool", </tool_call>')
    unknown = protocol.parse_turn('<tool_call>{"name": "draw", "arguments": {}}</tool_call>')
    bad_box = protocol.parse_turn('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 1200, 5]}}</tool_call>')
    empty = protocol.parse_turn("<answer> </answer>")
    assert protocol.is_malformed(bad_json) and protocol.is_malformed(empty)
    assert not protocol.is_malformed(unknown) and not protocol.is_malformed(bad_box)
    msgs = [{"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "q"}]}]
    text = protocol.malformed_message(unknown, msgs)["content"][0]["text"]
    assert text == "Error: Unknown tool 'draw'"
    text = protocol.malformed_message(bad_box, msgs)["content"][0]["text"]
    assert text == "Error: In relative mode, coordinates must be in [0, 1000.0]. Got: [0, 0, 1200, 5]"
    assert protocol.malformed_message(bad_box, msgs, profile="mars")["content"][0]["text"].startswith("Error: image_zoom_in_tool")
