"""The example scripts in examples/: each one run for real, small, or in DRY_RUN=1 mode.

DRY_RUN=1 prints the command lines a script would run; every `mars …` line is parsed with
the real CLI parser (flags exist, values convert, required options are there), so the
recipes cannot drift from the CLI.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from helpers_rollout import OpenAIStub, answer, call, make_image
from mars_cli import protocol, sensenova

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
    cmds = parse_lines(lines, tmp_path / "parse")
    assert not list(tmp_path.rglob("*.jsonl")), "a dry run wrote files"
    return cmds, lines


def parse_lines(lines: list[str], scratch: Path) -> list[list[str]]:
    """Each `mars …` line parsed by the real CLI; the argv lists.

    Output flags are checked as they are parsed (their folder must exist), so this parses
    in `scratch` where the run's own `mkdir -p` lines are carried out in order, as a real run does.
    """
    cmds = []
    scratch.mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        for line in lines:
            argv = shlex.split(line)
            if argv[:2] == ["mkdir", "-p"]:
                for d in argv[2:]:
                    Path(d).mkdir(parents=True, exist_ok=True)
            if argv[0] != "mars":
                continue
            check_values(parse_mars(argv[1:]))
            cmds.append(argv)
    finally:
        os.chdir(cwd)
    return cmds


def flag(argv: list[str], name: str) -> str:
    """The value after flag NAME (the last occurrence)."""
    i = len(argv) - 1 - argv[::-1].index(name)
    return argv[i + 1]


def test_parse_mars_rejects_drift():
    """The checker itself: unknown flags, bad values and missing options fail."""
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


def sensenova_jsonl(tmp_path: Path) -> Path:
    """Three SenseNova-MARS rows (easy, hard, hard) with precomputed image-search results."""
    d = tmp_path / "bench"
    (d / "imgs").mkdir(parents=True)
    make_image(d / "imgs" / "q.jpg", size=(448, 336))
    make_image(d / "imgs" / "t1.jpg", size=(64, 64), color=(10, 200, 10))
    rows = []
    for i, (q, gold, level) in enumerate([("Who built this tower?", "Gustave Eiffel", "easy"),
                                          ("In which year was it finished?", "1889", "hard"),
                                          ("How tall is it in metres?", "330", "hard")]):
        rows.append({"data_source": "mars-eval", "prompt": f"<image>\n{q}", "image": "imgs/q.jpg",
                     "reward_model": {"ground_truth": gold}, "extra_info": {"index": i}, "difficulty": level,
                     "image_search_title_list": ["Eiffel Tower - Wikipedia"], "image_search_thumbnail_list": ["imgs/t1.jpg"]})
    path = d / "mars_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
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
    # episodes are written as they finish, in any order: compare in task order
    judged.sort(key=lambda t: (t["meta"].get("index", 0) if isinstance(t.get("meta"), dict) else 0, str(t["id"])))
    assert [t["rewards"]["accuracy"] for t in judged] == [1.0, 1.0, 0.0, 0.0]
    assert (tmp_path / "run" / "episodes.html").stat().st_size > 1000


def test_eval_openai_needs_data(tmp_path):
    r = run_script("eval_openai.sh", tmp_path, {}, timeout=30)
    assert r.returncode == 2 and "set DATA" in r.stderr


@pytest.mark.network
def test_eval_openai_with_an_llm_judge_and_keys_from_the_environment(tmp_path):
    """Open questions judged by an LLM judge (a second stub); the keys never reach a file."""
    src = sensenova_jsonl(tmp_path)
    # the default rubric is the official one: it answers <judge>Yes</judge>
    with OpenAIStub([answer("Eiffel")]) as model, OpenAIStub(["<judge>Yes</judge>\n<reason>same person</reason>"]) as judge:
        r = run_script("eval_openai.sh", tmp_path, {
            "MODEL": "stub-vlm", "BASE_URL": model.url, "DATA": str(src), "FORMAT": "sensenova-mars", "WORK": "run",
            "BY": "difficulty", "JUDGE_BASE_URL": judge.url, "JUDGE_MODEL": "stub-judge",
            "OPENAI_API_KEY": "sk-model-secret", "MARS_JUDGE_API_KEY": "sk-judge-secret"}, timeout=120)
    assert r.returncode == 0, r.stderr
    # "Eiffel" is not the gold "Gustave Eiffel" by the rules; the judge's yes makes it right.
    judged = records((tmp_path / "run" / "judged.jsonl").read_text())
    assert [t["rewards"]["accuracy"] for t in judged] == [1.0, 1.0, 1.0]
    assert len(judge.requests) == 3 and {q["model"] for q in judge.requests} == {"stub-judge"}
    assert {h["authorization"] for h in model.headers} == {"Bearer sk-model-secret"}
    assert {h["authorization"] for h in judge.headers} == {"Bearer sk-judge-secret"}
    subsets = {m["subset"]: m for m in records(r.stdout)}
    assert set(subsets) == {None, "easy", "hard"} and subsets["hard"]["episodes"] == 2
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert b"secret" not in f.read_bytes(), f
    assert "secret" not in r.stdout + r.stderr


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
        assert flag(u, "--batch-size") == "256"  # 4 optimizer steps per 1024 trajectories: GSPO's clip can act
    # Each step trains the checkpoint the previous step wrote.
    assert [flag(u, "--policy") for u in updates[1:]] == [flag(u, "--out") for u in updates[:-1]]
    rollouts = by_command(cmds, "rollout")
    train = [c for c in rollouts if flag(c, "-n") == "8"]
    assert len(train) == 3
    # One policy server for the whole run, on all 8 GPUs, started after SFT and kept across steps.
    (serve,) = by_command(cmds, "serve")
    assert flag(serve, "--engine") == "vllm" and flag(serve, "--policy") == flag(sft, "--out")
    assert int(flag(serve, "--tp")) * int(flag(serve, "--dp")) == 8 and flag(serve, "--allow-load") == "runs/mars"
    url = "http://127.0.0.1:" + flag(serve, "--port")
    assert cmds.index(serve) > cmds.index(sft)
    for c in rollouts:
        assert flag(c, "--server") == url and "--engine" not in c and flag(c, "--max-turns") == "10"
        assert flag(c, "--policy") and flag(c, "--max-inflight")  # --policy: the server must serve exactly it
        assert flag(c, "--llm-base-url").endswith(":8001/v1") and "--summarize" in c and flag(c, "--cache")
        assert (flag(c, "--min-pixels"), flag(c, "--max-pixels"), flag(c, "--max-prompt-tokens")) == ("65536", "8294400", "16384")
    # Each update: the server sleeps (GPUs lent to the trainer), then loads the new checkpoint (no restart).
    for u in updates:
        assert flag(u, "--push") == url
        before = lines[lines.index(next(ln for ln in lines if ln.startswith("mars update") and flag(u, "--out") in ln)) - 1]
        assert before.startswith("curl ") and "/sleep" in before and url in before
    assert {flag(c, "--seed") for c in train} == {"1", "2", "3"}
    assert all(flag(c, "--presence-penalty") == "1.5" for c in train)  # the official rollouts' penalty
    assert all(flag(c, "--sampling") == "official" for c in rollouts if c not in train)  # T 0.7, top-p 0.8, top-k 20
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
    cmds = parse_lines(r.stdout.splitlines(), tmp_path / "parse")
    assert not by_command(cmds, "sft")
    assert [flag(c, "--format") for c in by_command(cmds, "data", "convert")] == ["vstar"]
    updates = by_command(cmds, "update")
    assert [flag(u, "--out") for u in updates] == ["runs/mars/ckpt/step-2", "runs/mars/ckpt/step-3"]
    assert flag(updates[0], "--policy") == "runs/mars/ckpt/step-1"
    assert [flag(c, "-o") for c in by_command(cmds, "rollout") if flag(c, "-n") == "8"] == ["runs/mars/steps/3/rollout.jsonl"]


# ---------------------------------------------------------------- eval_released_checkpoint.sh

def test_eval_released_checkpoint_dry_run_parses(tmp_path):
    env = {"MODEL": "models/SenseNova-MARS-8B", "DATA": "data/hr_mmsearch.jsonl", "TP": "4"}
    cmds, lines = dry_run_commands("eval_released_checkpoint.sh", tmp_path, env)
    assert [c[1] for c in cmds] == ["data", "rollout", "judge", "eval", "show"]
    (convert,), (roll,), (ev,) = by_command(cmds, "data", "convert"), by_command(cmds, "rollout"), by_command(cmds, "eval")
    assert flag(convert, "--format") == "sensenova-mars"
    assert flag(roll, "--engine") == "vllm" and flag(roll, "--tp") == "4" and flag(roll, "--policy") == env["MODEL"]
    assert flag(roll, "--image-search-backend") == "precomputed" and flag(roll, "--cache") and "--replay" not in roll
    assert flag(roll, "--sampling") == "official" and flag(roll, "--seed") == "3407"  # as the official evaluation
    # the official inference/eval.py's rules (OpenSenseNova/SenseNova-MARS @ ce052d7): the sensenova-eval
    # profile, 50 turns of 4,096 tokens (eval.py:2246-2247), no budgets, the official pixel limits
    assert flag(roll, "--protocol") == "sensenova-eval" and "--system-prompt" not in roll
    assert [flag(roll, f) for f in ("--min-pixels", "--max-pixels", "--max-turns", "--max-new-tokens")] == \
        ["65536", "8294400", "50", "4096"]
    assert not {"--max-total-tokens", "--max-prompt-tokens", "--max-response-tokens"} & set(roll)
    assert flag(ev, "--by") == "difficulty"
    assert lines[lines.index(next(ln for ln in lines if ln.startswith("mars eval"))) + 1].startswith("cat ")  # metrics to stdout
    # A replay re-run reads tools from the same cache only; hf runs on a GPU by default.
    cmds, _ = dry_run_commands("eval_released_checkpoint.sh", tmp_path, {**env, "REPLAY": "1", "ENGINE": "hf"})
    (roll2,) = by_command(cmds, "rollout")
    assert "--replay" in roll2 and flag(roll2, "--cache") == flag(roll, "--cache")
    assert flag(roll2, "--engine") == "hf" and flag(roll2, "--device") == "cuda" and flag(roll2, "-o") != flag(roll, "-o")


@pytest.mark.slow  # ~20 s: a tiny model loaded and run on the CPU
def test_eval_released_checkpoint_runs_a_tiny_model_on_cpu(tmp_path, tiny_policy_dir):
    src = sensenova_jsonl(tmp_path)
    env = {"MODEL": str(tiny_policy_dir), "DATA": str(src), "ENGINE": "hf", "DEVICE": "cpu", "WORK": "run",
           "SEARCH_BACKEND": "local", "MAX_TURNS": "2", "MAX_NEW_TOKENS": "12", "MAX_TOTAL_TOKENS": "4096",
           "SYSTEM_PROMPT": sensenova.SYSTEM_PROMPT}  # a bare data file: no manifest, no dataset prompt
    live = run_script("eval_released_checkpoint.sh", tmp_path, env, timeout=300)
    assert live.returncode == 0, live.stderr
    tasks = records((tmp_path / "run" / "tasks" / "tasks.jsonl").read_text())
    assert [t["meta"]["difficulty"] for t in tasks] == ["easy", "hard", "hard"]
    assert all(len(t["image_search_thumbnail_list"]) == 1 for t in tasks)
    metrics = records(live.stdout)
    by = {(m["by"], m["subset"]): m for m in metrics}
    assert set(by) == {(None, None), ("difficulty", "easy"), ("difficulty", "hard")}, metrics
    assert by[None, None]["episodes"] == 3 and by["difficulty", "hard"]["episodes"] == 2
    name = Path(tiny_policy_dir).name
    assert by[None, None]["label"] == f"{name}-live" and by[None, None]["benchmark"] == "mars-eval"
    trajs = records((tmp_path / "run" / "live.jsonl").read_text())
    assert len(trajs) == 3 and all(t["tokens"]["ids"] for t in trajs)
    assert (tmp_path / "run" / "live.html").exists()


@pytest.mark.network
def test_eval_released_checkpoint_tools_precomputed_and_replayed(tmp_path):
    """The checkpoint behind an OpenAI-compatible server (stub): image search from the
    benchmark's stored results, text search recorded in the cache, then replayed from it."""
    src = sensenova_jsonl(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "p1", "title": "Eiffel Tower",
                                  "text": "The Eiffel Tower was built by Gustave Eiffel and finished in 1889."}) + "\n")
    subprocess.run([str(VENV_BIN / "mars"), "index", "text", str(corpus), "--out", str(tmp_path / "idx")],
                   check=True, capture_output=True)
    env = {"ENGINE": "openai", "MODEL": "SenseNova-MARS-8B", "DATA": str(src), "WORK": "run", "INDEX": str(tmp_path / "idx"),
           "MAX_TURNS": "4", "SYSTEM_PROMPT": sensenova.SYSTEM_PROMPT}

    def script(query):
        return [call(protocol.IMAGE_SEARCH, img_idx=0), call(protocol.TEXT_SEARCH, query=query), answer("Gustave Eiffel")]

    with OpenAIStub(script("Eiffel Tower builder")) as stub:
        live = run_script("eval_released_checkpoint.sh", tmp_path, {**env, "BASE_URL": stub.url}, timeout=120)
    assert live.returncode == 0, live.stderr
    trajs = records((tmp_path / "run" / "live.jsonl").read_text())
    assert len(trajs) == 3 and all([c["ok"] for c in t["tool_calls"]] == [True, True] for t in trajs)
    tool_text = json.dumps([m for m in trajs[0]["messages"] if m["role"] == "tool"])
    assert "Eiffel Tower - Wikipedia" in tool_text and "finished in 1889" in tool_text
    easy = next(m for m in records(live.stdout) if m["subset"] == "easy")
    assert easy["pass@1"] == 1.0
    # Replay: the recorded query is answered from the cache; a new query is a miss, not a search.
    for query, ok in (("Eiffel Tower builder", True), ("a query never recorded", False)):
        (tmp_path / "run" / "replay.jsonl").unlink(missing_ok=True)  # else --resume keeps the last episodes
        with OpenAIStub(script(query)) as stub:
            r = run_script("eval_released_checkpoint.sh", tmp_path, {**env, "BASE_URL": stub.url, "REPLAY": "1"}, timeout=120)
        assert r.returncode == 0, r.stderr
        calls = [t["tool_calls"][1] for t in records((tmp_path / "run" / "replay.jsonl").read_text())]
        assert [c["ok"] for c in calls] == [ok] * 3, calls
        assert ok or all("no recorded result" in c["error"] for c in calls), calls


def test_examples_are_executable_and_documented():
    readme = (EXAMPLES / "README.md").read_text()
    for name in ("eval_openai.sh", "gpu_recipe.sh", "eval_released_checkpoint.sh"):
        assert os.access(EXAMPLES / name, os.X_OK), name
        assert f"`{name}`" in readme, name
