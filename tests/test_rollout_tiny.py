"""`mars rollout` end to end: the tiny model on CPU, real crops, a real local text index, --check."""

from __future__ import annotations

import json

import orjson
import pytest
from typer.testing import CliRunner

from helpers_rollout import ScriptedEngine, answer, call, make_image, turn_script
from mars_cli import protocol
from mars_cli.agent.check import check_trajectory
from mars_cli.agent.loop import AgentLoop, Limits
from mars_cli.agent.run import open_toolbox
from mars_cli.main import app
from mars_cli.records import make_task, validate


@pytest.fixture(scope="module")
def rollout_file(tiny_policy_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("rollout")
    imgs = [make_image(d / f"img{i}.jpg", size=(112 + 28 * i, 84)) for i in range(2)]
    tasks = d / "tasks.jsonl"
    tasks.write_bytes(b"".join(orjson.dumps(make_task(f"t{i}", f"What is in picture {i}?", images=[im], answers=["x"]))
                               + b"\n" for i, im in enumerate(imgs)))
    out = d / "traj.jsonl"
    r = CliRunner().invoke(app, ["rollout", str(tasks), "--policy", str(tiny_policy_dir), "-n", "2", "--max-turns", "2",
                                 "--max-new-tokens", "8", "--seed", "0", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    return out


def test_tiny_rollout_records(rollout_file, tiny_policy_dir):
    recs = [json.loads(line) for line in rollout_file.read_text().splitlines()]
    assert sorted((r["group"], r["sample"]) for r in recs) == [("t0", 0), ("t0", 1), ("t1", 0), ("t1", 1)]
    for r in recs:
        validate(r, "trajectory")
        # a random model rarely writes a valid action: its turns end at the token limit
        assert r["finish"] in ("max_tokens", "no_action", "max_turns", "answer")
        assert r["policy"]["engine"] == "hf" and r["policy"]["path"] == str(tiny_policy_dir)
        assert r["policy"]["sampling"]["temperature"] == 1.0 and r["policy"]["fingerprint"]
        toks = r["tokens"]
        assert 1 <= toks["mask"].count(1) <= 16 and toks["ids"].count(151655) == len(toks["images"]) == 1


def test_stored_logprobs_match_a_forward_pass(rollout_file, tiny_policy_dir):
    from mars_cli.models.logprobs import token_logprobs
    from mars_cli.models.load import load_policy

    policy = load_policy(tiny_policy_dir)
    recs = [json.loads(line) for line in rollout_file.read_text().splitlines()]
    lps = token_logprobs(policy, [(r["tokens"]["ids"], r["tokens"]["images"]) for r in recs])
    for r, lp in zip(recs, lps):
        mask = r["tokens"]["mask"]
        got = [x for x, m in zip(lp.tolist(), mask) if m]
        want = [x for x, m in zip(r["tokens"]["logprobs"], mask) if m]
        assert got == pytest.approx(want, abs=2e-3)


def test_check_passes_and_catches_tampering(rollout_file, tiny_policy_dir, tmp_path):
    r = CliRunner().invoke(app, ["rollout", "--check", "--policy", str(tiny_policy_dir), str(rollout_file)])
    assert r.exit_code == 0, r.stderr
    checked = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(checked) == 4 and all(c["check"] == {"ok": True, "problems": []} for c in checked)
    recs = [json.loads(line) for line in rollout_file.read_text().splitlines()]
    recs[0]["tokens"]["ids"][-1] = 9707 if recs[0]["tokens"]["ids"][-1] != 9707 else 11  # edit a generated token
    recs[1]["tokens"]["ids"].insert(3, 11)  # shift the prompt
    recs[1]["tokens"]["mask"].insert(3, 0)
    recs[1]["tokens"]["logprobs"].insert(3, 0.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(x) + "\n" for x in recs))
    r = CliRunner().invoke(app, ["rollout", "--check", "--policy", str(tiny_policy_dir), str(bad)])
    assert r.exit_code == 1
    checked = [json.loads(line) for line in r.stdout.splitlines()]
    assert [c["check"]["ok"] for c in checked] == [False, False, True, True]
    assert "decoding the generated ids" in checked[0]["check"]["problems"][0]
    assert "initial prompt differs" in checked[1]["check"]["problems"][0]
    assert "2 of 4 trajectories failed" in r.stderr


def test_real_crop_and_local_index_with_tiny_tokenizer(tiny_policy_dir, tmp_path):
    """Scripted turns, but the real tokenizer, the real crop tool and a real BM25 index."""
    from mars_cli.models.load import load_tokenizer, special_ids
    from mars_cli.tools.index_text import build_text_index

    build_text_index([{"id": "1", "title": "Stop sign", "text": "A stop sign is a red octagon with white letters."},
                      {"id": "2", "title": "Oak", "text": "The oak is a tree."}], tmp_path / "idx")
    eng = ScriptedEngine(turn_script([call(protocol.ZOOM, bbox_2d=[0, 0, 500, 500]),
                                      call(protocol.TEXT_SEARCH, query="red octagon sign"), answer("stop")]))
    tok = load_tokenizer(tiny_policy_dir)
    eng.special = special_ids(tok)
    eng.renderer = protocol.Renderer(tok, eng.special)
    tb = open_toolbox(tmp_path / "art", index=str(tmp_path / "idx"))
    img = make_image(tmp_path / "a.jpg", size=(640, 480))
    [rec] = AgentLoop(eng, tb, limits=Limits(max_total_tokens=50_000)).run([make_task("t", "What sign?", images=[img])])
    assert rec["finish"] == "answer" and [c["ok"] for c in rec["tool_calls"]] == [True, True]
    assert "red octagon" in rec["messages"][5]["content"][0]["text"]
    assert check_trajectory(rec, eng.renderer) == []


def test_pixel_limits_reach_the_engine_and_the_record(tiny_policy_dir, tmp_path):
    from clirun import Ran

    img = make_image(tmp_path / "big.jpg", size=(640, 480))
    r = Ran(["ask", img, "What?", "--policy", tiny_policy_dir, "--json", "-q", "--max-turns", "1",
             "--max-new-tokens", "4", "--min-pixels", "3136", "--max-pixels", "50176", "--artifacts", tmp_path / "a"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["policy"]["pixels"] == {"min": 3136, "max": 50176}
    # the record holds the limits the image processor used; without flags, the checkpoint's own
    r = Ran(["ask", img, "What?", "--policy", tiny_policy_dir, "--json", "-q", "--max-turns", "1",
             "--max-new-tokens", "4", "--artifacts", tmp_path / "a"])
    from mars_cli.models.load import load_image_processor

    size = load_image_processor(tiny_policy_dir).size
    assert json.loads(r.stdout)["policy"]["pixels"] == {"min": size["shortest_edge"], "max": size["longest_edge"]}


def test_system_prompt_and_search_k_reach_the_episode(tiny_policy_dir, tmp_path, monkeypatch):
    """--system-prompt replaces the prompt the policy sees; --search-k sets the results per search."""
    from mars_cli.agent import run as runner
    from mars_cli.tools.index_text import build_text_index

    build_text_index([{"id": str(i), "title": f"Oak {i}", "text": f"Oak {i} is a tree."} for i in range(4)],
                     tmp_path / "idx")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(orjson.dumps(make_task("t", "Which oak?", answers=["x"])) + b"\n")
    seen = {}
    real_open = runner.open_toolbox

    def spy(*a, **kw):
        seen["toolbox"] = tb = real_open(*a, **kw)
        return tb

    monkeypatch.setattr(runner, "open_toolbox", spy)
    out = tmp_path / "t.jsonl"
    r = CliRunner().invoke(app, ["rollout", str(tasks), "--policy", str(tiny_policy_dir), "--max-turns", "1",
                                 "--max-new-tokens", "4", "--protocol", "mars", "--system-prompt", "Be brief.",
                                 "--index", str(tmp_path / "idx"), "--search-k", "2", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    [rec] = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["messages"][0] == {"role": "system", "content": "Be brief."}
    tb = seen["toolbox"]
    assert tb.k == 2 and len(tb.text_search.search("oak", k=tb.k)) == 2
    r = CliRunner().invoke(app, ["rollout", str(tasks), "--policy", str(tiny_policy_dir), "--search-k", "0"])
    assert r.exit_code == 2 and "--search-k" in r.stderr
