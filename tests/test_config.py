"""`--config FILE` on every command: precedence flag > MARS_* > file > default, YAML and TOML,
byte-identical output from the file or the flag, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clirun import Ran

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def judged(tmp_path):
    f = tmp_path / "judged.jsonl"
    recs = [{"schema_version": 1, "group": f"g{g}", "sample": s, "reward": float((g + s) % 2) + 0.1 * s}
            for g in range(2) for s in range(3)]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return f


def _algo(stdout: str) -> str:
    return json.loads(stdout.splitlines()[0])["advantage_stats"]["algo"]


def test_file_and_flag_give_byte_identical_output(judged, tmp_path):
    (tmp_path / "a.yaml").write_text("algo: grpo\neps: 0.001\nbatch-norm: false\n")
    (tmp_path / "a.toml").write_text('algo = "grpo"\neps = 0.001\nbatch_norm = false\n')
    flags = Ran(["advantage", judged, "--algo", "grpo", "--eps", "0.001", "--no-batch-norm"])
    yaml_ = Ran(["advantage", judged, "--config", tmp_path / "a.yaml"])
    toml_ = Ran(["advantage", judged, "--config", tmp_path / "a.toml"])
    assert flags.exit_code == yaml_.exit_code == toml_.exit_code == 0, yaml_.stderr + toml_.stderr
    assert flags.stdout == yaml_.stdout == toml_.stdout
    assert flags.stdout != Ran(["advantage", judged]).stdout  # the settings do change the output


def test_precedence_flag_then_env_then_file_then_default(judged, tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("algo: grpo\n")
    assert _algo(Ran(["advantage", judged]).stdout) == "bn-gspo"                                  # default
    assert _algo(Ran(["advantage", judged, "--config", cfg]).stdout) == "grpo"                   # file
    env = {"MARS_ADVANTAGE_ALGO": "rloo"}
    assert _algo(Ran(["advantage", judged, "--config", cfg], env=env).stdout) == "rloo"          # env over file
    assert _algo(Ran(["advantage", judged, "--config", cfg, "--algo", "dr-grpo"], env=env).stdout) == "dr-grpo"  # flag


def test_unknown_keys_and_bad_files_are_usage_errors_naming_the_file(judged, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: grpo\nlearning_rate: 3\n")
    r = Ran(["advantage", judged, "--config", bad])
    assert r.exit_code == 2 and f"--config {bad}: unknown option 'learning_rate' for `advantage`" in r.stderr
    assert "known: algo," in r.stderr and r.stdout == ""
    broken = tmp_path / "broken.toml"
    broken.write_text("algo = \n")
    r = Ran(["advantage", judged, "--config", broken])
    assert r.exit_code == 2 and f"--config {broken}: cannot parse" in r.stderr
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    r = Ran(["advantage", judged, "--config", lst])
    assert r.exit_code == 2 and "expected a mapping" in r.stderr
    r = Ran(["advantage", judged, "--config", tmp_path / "missing.yaml"])
    assert r.exit_code == 2 and "missing.yaml" in r.stderr


def test_every_command_and_subcommand_takes_config():
    import typer

    from mars_cli.main import COMMANDS, app

    root = typer.main.get_command(app)
    ctx = type(root).context_class(root) if hasattr(type(root), "context_class") else None
    seen = []

    def walk(cmd, path):
        if getattr(cmd, "commands", None) is not None:
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
        else:
            assert "config" in [p.name for p in cmd.params], path
            seen.append(" ".join(path))

    for name in COMMANDS:
        cmd = root.get_command(ctx, name)
        if cmd is not None:
            walk(cmd, [name])
    assert {"update", "sft", "eval", "plot", "index text", "index images", "data convert"} <= set(seen)
    r = subprocess.run([sys.executable, "-m", "mars_cli", "index", "text", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "COLUMNS": "250"})
    assert "--config" in r.stdout and "YAML or TOML" in r.stdout


def test_config_reaches_a_subcommand_of_a_group(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "1", "title": "Eiffel Tower", "text": "A tower in Paris."}\n')
    cfg = tmp_path / "idx.toml"
    cfg.write_text(f'out = "{tmp_path / "idx"}"\nchunk = 7\n')
    r = Ran(["index", "text", corpus, "--config", cfg])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "idx" / "manifest.json").exists()


def test_a_repeatable_option_takes_a_list_or_one_value(tmp_path):
    f = tmp_path / "j.jsonl"
    recs = [{"schema_version": 1, "id": f"t{i}", "question": "q", "images": [], "answers": ["a"], "group": f"t{i}",
             "sample": 0, "messages": [], "tool_calls": [], "prediction": "a", "finish": "answer",
             "rewards": {"accuracy": float(i % 2), "format": 1.0}, "reward": 1.0, "meta": {"category": f"c{i % 2}"}}
            for i in range(4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "one.yaml").write_text("by: category\nquiet: true\n")
    (tmp_path / "list.toml").write_text('by = ["category"]\nquiet = true\n')
    flag = Ran(["eval", f, "--by", "category", "-q"])
    assert flag.exit_code == 0 and len(flag.stdout.splitlines()) == 3
    assert Ran(["eval", f, "--config", tmp_path / "one.yaml"]).stdout == flag.stdout
    assert Ran(["eval", f, "--config", tmp_path / "list.toml"]).stdout == flag.stdout
