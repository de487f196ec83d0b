"""The example scripts in examples/: each one run for real, small, or in DRY_RUN=1 mode.

DRY_RUN=1 prints the command lines a script would run; every `mars …` line is parsed with
the real CLI parser (flags exist, values convert, required options are there), so the
recipes cannot drift from the CLI.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from helpers_rollout import OpenAIStub, answer, call, make_image
from mars_cli import protocol

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
VENV_BIN = Path(sys.executable).parent


def run_script(name: str, tmp_path: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run examples/NAME with `mars` from this interpreter's venv, in tmp_path, MARS_* cleared."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MARS_") and "API_KEY" not in k}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run(["bash", str(EXAMPLES / name)], cwd=tmp_path, env={**base, **env}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- parsing dry runs

def _rest(ctx) -> list[str]:
    return list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []) + list(ctx.args)


def parse_mars(argv: list[str]):
    """Parse `mars ARGV` down to the leaf command without running it; its click context."""
    from mars_cli.main import app

    group = typer.main.get_command(app)
    ctx = group.make_context("mars", list(argv))
    cmd = group
    while hasattr(cmd, "resolve_command"):
        name, cmd, rest = cmd.resolve_command(ctx, _rest(ctx))
        ctx = cmd.make_context(name, rest, parent=ctx)
    assert not _rest(ctx), f"unparsed arguments {_rest(ctx)} in mars {' '.join(argv)}"
    return ctx


def check_values(ctx) -> None:
    """Values the parser takes as plain strings but the commands restrict."""
    from mars_cli.eval.formats import FORMATS
    from mars_cli.rl.advantage import ESTIMATORS
    from mars_cli.tools.image_search import BACKENDS as IMAGE_BACKENDS
    from mars_cli.tools.text_search import BACKENDS as TEXT_BACKENDS

    p = ctx.params
    allowed = {"engine": ("hf", "vllm", "openai"), "fmt": tuple(FORMATS), "algo": tuple(ESTIMATORS),
               "search_backend": TEXT_BACKENDS, "image_search_backend": IMAGE_BACKENDS, "loss": ("gspo", "grpo")}
    for key, values in allowed.items():
        if p.get(key) is not None:
            assert p[key] in values, f"{ctx.command_path}: {key}={p[key]!r} is not one of {values}"


def dry_run_commands(name: str, tmp_path: Path, env: dict) -> tuple[list[list[str]], list[str]]:
    """The `mars …` command lines of a DRY_RUN=1 run, each parsed by the real CLI, and all lines."""
    r = run_script(name, tmp_path, {"DRY_RUN": "1", **env}, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines, "a dry run printed nothing"
    cmds = []
    for line in lines:
        argv = shlex.split(line)
        if argv[0] != "mars":
            continue
        ctx = parse_mars(argv[1:])
        check_values(ctx)
        cmds.append(argv)
    assert not list(tmp_path.rglob("*.jsonl")), "a dry run wrote files"
    return cmds, lines


def flag(argv: list[str], name: str) -> str:
    """The value after flag NAME (the last occurrence)."""
    i = len(argv) - 1 - argv[::-1].index(name)
    return argv[i + 1]


def test_parse_mars_rejects_drift():
    """The checker itself: unknown flags, bad values and missing options fail."""
    import typer._click.exceptions as exc  # noqa: F401  (typer's vendored click)

    parse_mars(["update", "b.jsonl", "--policy", "p", "--out", "o", "--beta", "1e-4"])
    for bad in (["update", "b.jsonl", "--policy", "p", "--out", "o", "--betta", "1"],
                ["rollout", "-n", "eight"],
                ["update", "b.jsonl", "--policy", "p"],
                ["nosuch"]):
        with pytest.raises(Exception) as e:
            parse_mars(bad)
        assert type(e.value).__name__ in ("NoSuchOption", "BadParameter", "MissingParameter", "UsageError"), e.value
    with pytest.raises(AssertionError, match="engine"):
        check_values(parse_mars(["rollout", "--engine", "sglang"]))


# ---------------------------------------------------------------- eval_openai.sh

def hr_bench_tsv(path: Path, tmp_path: Path) -> Path:
    """A 4-question HR-Bench file: golds C, C, A, B; categories single, single, cross, cross."""
    img = Path(make_image(tmp_path / "scene.jpg", size=(640, 480)))
    b64 = base64.b64encode(img.read_bytes()).decode()
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"]
    rows = [[0, "What is on the sign?", "cat", "dog", "fox", "owl", "C", "single", "c1", b64],
            [1, "What colour is the car?", "red", "blue", "green", "grey", "C", "single", "c1", b64],
            [2, "Where is the flag?", "left", "right", "top", "bottom", "A", "cross", "c2", b64],
            [3, "How many birds?", "one", "two", "three", "four", "B", "cross", "c2", b64]]
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


@pytest.mark.network
def test_eval_openai_against_stub_server(tmp_path):
    src = hr_bench_tsv(tmp_path / "hr_bench_4k.tsv", tmp_path)
    # Every episode: zoom once, then answer C (right for the two "single" questions).
    with OpenAIStub([call(protocol.ZOOM, bbox_2d=[100, 100, 600, 600]), answer("C")]) as stub:
        r = run_script("eval_openai.sh", tmp_path, {
            "MODEL": "stub-vlm", "BASE_URL": stub.url, "DATA": str(src), "FORMAT": "hr-bench", "WORK": "run"}, timeout=120)
    assert r.returncode == 0, r.stderr
    metrics = records(r.stdout)
    assert metrics == records((tmp_path / "run" / "metrics.jsonl").read_text())
    by = {(m["by"], m["subset"]): m for m in metrics}
    assert set(by) == {(None, None), ("category", "single"), ("category", "cross")}, metrics
    overall = by[None, None]
    assert overall["kind"] == "metrics" and overall["benchmark"] == "hr-bench-4k" and overall["label"] == "stub-vlm"
    assert overall["episodes"] == 4 and overall["pass@1"] == pytest.approx(0.5) and overall["format"] == 1.0
    assert overall["tool_calls_by_tool"] == {"image_zoom_in_tool": 1.0}
    assert by["category", "single"]["pass@1"] == 1.0 and by["category", "cross"]["pass@1"] == 0.0
    # The model really was asked, with the image, twice per episode; no key was sent.
    assert len(stub.requests) == 8 and {q["model"] for q in stub.requests} == {"stub-vlm"}
    first = stub.requests[0]["messages"][1]["content"]
    assert any(p.get("type") == "image_url" for p in first)
    assert all(h.get("authorization") == "Bearer EMPTY" for h in stub.headers)
    judged = records((tmp_path / "run" / "judged.jsonl").read_text())
    assert [t["rewards"]["accuracy"] for t in judged] == [1.0, 1.0, 0.0, 0.0]
    assert (tmp_path / "run" / "episodes.html").stat().st_size > 1000


def test_eval_openai_needs_data(tmp_path):
    r = run_script("eval_openai.sh", tmp_path, {}, timeout=30)
    assert r.returncode == 2 and "set DATA" in r.stderr


# ---------------------------------------------------------------- gpu_recipe.sh

def by_command(cmds: list[list[str]], *names: str) -> list[list[str]]:
    return [c for c in cmds if c[1:1 + len(names)] == list(names)]


def test_gpu_recipe_dry_run_parses_and_has_the_papers_numbers(tmp_path):
    cmds, lines = dry_run_commands("gpu_recipe.sh", tmp_path, {"STEPS": "3", "EVAL_EVERY": "2",
                                                                "EVAL_SETS": "hr-mmsearch=hr.parquet vstar=vstar_bench"})
    shuf = [ln for ln in lines if ln.startswith("shuf ")]
    assert len(shuf) == 3 and all(ln.startswith("shuf -n 128 --random-source=") for ln in shuf)
    assert len(set(shuf)) == 3  # each step draws its own prompts
    (sft,) = by_command(cmds, "sft")
    assert [flag(sft, f) for f in ("--nproc", "--zero")] == ["8", "3"] and "--bf16" in sft
    updates = by_command(cmds, "update")
    assert len(updates) == 3
    for u in updates:
        assert flag(u, "--lr") == "1e-6" and float(flag(u, "--beta")) == 1e-4
        assert flag(u, "--ref") == flag(sft, "--out") and flag(u, "--nproc") == "8" and flag(u, "--zero") == "3"
        assert "--bf16" in u and flag(u, "--state")
    # Each step trains the checkpoint the previous step wrote.
    assert [flag(u, "--policy") for u in updates[1:]] == [flag(u, "--out") for u in updates[:-1]]
    rollouts = by_command(cmds, "rollout")
    train = [c for c in rollouts if flag(c, "-n") == "8"]
    assert len(train) == 3
    for c in rollouts:
        assert flag(c, "--engine") == "vllm" and flag(c, "--max-turns") == "10" and flag(c, "--tp")
        assert flag(c, "--llm-base-url").endswith(":8001/v1") and "--summarize" in c and flag(c, "--cache")
    assert {flag(c, "--seed") for c in train} == {"1", "2", "3"}
    assert all(flag(a, "--algo") == "bn-gspo" for a in by_command(cmds, "advantage"))
    assert all(flag(j, "--judge-base-url").endswith(":8001/v1") for j in by_command(cmds, "judge"))
    # Held-out evaluation: after SFT, at step 2 and at the last step, on both benchmarks.
    labels = [flag(c, "--label") for c in by_command(cmds, "eval")]
    assert labels == ["sft", "sft", "step-2", "step-2", "step-3", "step-3"]
    convert = by_command(cmds, "data", "convert")
    assert [flag(c, "--format") for c in convert] == ["sensenova-mars", "hr-mmsearch", "vstar"]


def test_gpu_recipe_resumes_after_the_last_checkpoint(tmp_path):
    w = tmp_path / "runs" / "mars"
    for done in ("policy-sft", "ckpt/step-1", "data/rl/tasks.jsonl"):
        (w / done).parent.mkdir(parents=True, exist_ok=True)
        (w / done).mkdir() if not done.endswith(".jsonl") else (w / done).write_text("")
    (w / "steps" / "2").mkdir(parents=True)
    (w / "steps" / "2" / "batch.jsonl").write_text("")  # step 2's batch is ready, only its update is left
    env = {"STEPS": "3", "EVAL_EVERY": "100", "EVAL_SETS": "vstar=v"}
    r = run_script("gpu_recipe.sh", tmp_path, {"DRY_RUN": "1", **env}, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(ln) for ln in r.stdout.splitlines() if ln.startswith("mars ")]
    for c in cmds:
        parse_mars(c[1:])
    assert not by_command(cmds, "sft")
    assert [flag(c, "--format") for c in by_command(cmds, "data", "convert")] == ["vstar"]
    updates = by_command(cmds, "update")
    assert [flag(u, "--out") for u in updates] == ["runs/mars/ckpt/step-2", "runs/mars/ckpt/step-3"]
    assert flag(updates[0], "--policy") == "runs/mars/ckpt/step-1"
    assert [flag(c, "-o") for c in by_command(cmds, "rollout") if flag(c, "-n") == "8"] == ["runs/mars/steps/3/rollout.jsonl"]
