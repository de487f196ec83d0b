"""Presets: the official evaluation sampling and the released training script's settings."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mars_cli.main import app


def judged(n_groups=2, size=3):
    recs = []
    for g in range(n_groups):
        for s in range(size):
            recs.append({"schema_version": 1, "id": f"g{g}", "question": "q", "images": [], "answers": ["a"], "group": f"g{g}",
                         "sample": s, "messages": [], "tool_calls": [], "prediction": "a", "finish": "answer",
                         "tokens": None, "rewards": {"accuracy": float(s == g)}, "reward": float(s == g) + g})
    return "".join(json.dumps(r) + "\n" for r in recs)


def test_advantage_official_script_is_grpo_without_batch_norm():
    res = CliRunner().invoke(app, ["advantage", "--preset", "official-script"], input=judged())
    assert res.exit_code == 0, res.output
    stats = [json.loads(x)["advantage_stats"] for x in res.stdout.splitlines()]
    assert {s["algo"] for s in stats} == {"grpo"} and all(s.get("batch_mean") is None for s in stats)
    res = CliRunner().invoke(app, ["advantage", "--preset", "official-script", "--algo", "bn-gspo"], input=judged())
    assert {json.loads(x)["advantage_stats"]["algo"] for x in res.stdout.splitlines()} == {"bn-gspo"}  # a flag wins
    res = CliRunner().invoke(app, ["advantage", "--preset", "nope"], input=judged())
    assert res.exit_code == 2


def test_update_official_script_settings(monkeypatch, tmp_path):
    import mars_cli.rl.engine as engine
    import mars_cli.rl.update as update

    seen = {}
    monkeypatch.setattr(engine, "launch_ranks", lambda *a, **k: None)
    monkeypatch.setattr(update, "run_update", lambda paths, cfg, **k: seen.setdefault("cfg", cfg) and {"loss": 0.0})
    args = ["update", "b.jsonl", "--policy", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "official-script"]
    res = CliRunner().invoke(app, args + ["--lr", "2e-6"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    # verl's policy loss as the script runs it: dual clip and token-mean per micro-batch (grpo-verl)
    assert (cfg.loss, cfg.eps_low, cfg.eps_high, cfg.beta, cfg.old_logprobs, cfg.mini_batch) == ("grpo-verl", 0.2, 0.28, 0.0, "rollout", None)
    assert cfg.lr == 2e-6  # the explicit flag
    seen.clear()
    assert CliRunner().invoke(app, args[:-2]).exit_code == 0
    assert (seen["cfg"].loss, seen["cfg"].lr, seen["cfg"].beta) == ("gspo", 1e-6, 1e-4)  # the paper's BN-GSPO recipe


def test_rollout_sampling_profiles(monkeypatch):
    import mars_cli.agent.run as run

    seen = {}
    monkeypatch.setattr(run, "rollout", lambda files, **kw: seen.update(kw))
    assert CliRunner().invoke(app, ["rollout", "--sampling", "official"], input="").exit_code == 0
    assert seen["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5, "seed": None}
    assert CliRunner().invoke(app, ["rollout", "--sampling", "greedy", "--top-k", "5"], input="").exit_code == 0
    assert seen["sampling"]["temperature"] == 0.0 and seen["sampling"]["top_k"] == 5


def test_rollout_official_script_is_train_multi_node_sh(monkeypatch):
    # train_multi_node.sh (OpenSenseNova/SenseNova-MARS @ ce052d7): rollout.presence_penalty=1.5,
    # rollout.seed=3407, max_assistant_turns=10, max_prompt_length = max_response_length = 16384,
    # max_model_len 32768; async_sglang_server.py:237 caps a turn at min(response_length, max_model_len - prompt - 1)
    import mars_cli.agent.run as run

    seen = {}
    monkeypatch.setattr(run, "rollout", lambda files, **kw: seen.update(kw))
    res = CliRunner().invoke(app, ["rollout", "--preset", "official-script", "--max-turns", "4"], input="")
    assert res.exit_code == 0, res.output
    assert seen["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "presence_penalty": 1.5, "seed": 3407}
    assert seen["limits"] == {"max_turns": 4, "max_prompt_tokens": 16384, "max_response_tokens": 16384,
                              "max_total_tokens": 32767, "max_new_tokens": 16384}  # --max-turns: the flag wins
    assert CliRunner().invoke(app, ["rollout", "--preset", "nope"], input="").exit_code == 2


@pytest.mark.parametrize("prompt", [16383, 16384])
def test_official_script_gives_a_turn_what_the_sglang_server_gives_it(tmp_path, prompt):
    """async_sglang_server.py:237 (OpenSenseNova/SenseNova-MARS @ ce052d7): max_new_tokens =
    min(response_length 16,384, max_model_len 32,768 − len(prompt_ids) − 1)."""
    from helpers_rollout import ScriptedEngine, answer, turn_script
    from mars_cli.agent.loop import AgentLoop, Limits
    from mars_cli.agent.toolbox import Toolbox
    from mars_cli.presets import TRAINING, split_sampling

    asked = []

    class Asked(ScriptedEngine):
        def generate(self, requests):
            asked.extend(r.max_new_tokens for r in requests)
            return super().generate(requests)

    _, limits = split_sampling(TRAINING["official-script"]["rollout"])

    def first_turn(question):
        loop = AgentLoop(Asked(turn_script([answer("a")])), Toolbox(tmp_path / "art"), limits=Limits(**limits))
        [rec] = loop.run([{"schema_version": 1, "id": "t", "question": question, "answers": ["a"]}], n=1)
        return rec

    mask = first_turn("q")["tokens"]["mask"]
    rec = first_turn("q" + "x" * (prompt - mask.index(1)))  # one token a byte
    assert rec["tokens"]["mask"].index(1) == prompt and rec["finish"] == "answer"
    assert asked[-1] == min(16384, 32768 - prompt - 1)
