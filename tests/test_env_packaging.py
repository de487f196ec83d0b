"""`mars env`, shell completion, and man pages installed by both wheel and editable builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clirun import Ran
from mars_cli.envinfo import masked

ROOT = Path(__file__).resolve().parent.parent


def test_env_report_masks_secrets():
    env = {"MARS_JUDGE_API_KEY": "sk-very-secret", "MARS_JUDGE_BASE_URL": "https://user:hunter2@judge.example/v1",
           "OPENAI_API_KEY": "sk-other", "MARS_ZERO": "3"}
    r = Ran(["env"], env=env)
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    for word in ("python", "mars", "torch", "transformers", "deepspeed", "vllm", "cuda:"):
        assert word in out
    assert "sk-very-secret" not in out and "sk-other" not in out and "hunter2" not in out
    assert "MARS_JUDGE_API_KEY=(set, 14 characters)" in out and "https://user:***@judge.example/v1" in out
    assert "MARS_ZERO=3" in out
    r = Ran(["env", "--json"], env=env)
    rec = json.loads(r.stdout)
    assert rec["kind"] == "env" and rec["versions"]["mars"] and "cuda_available" in rec["accelerator"]
    assert rec["settings"]["OPENAI_API_KEY"] == "(set, 8 characters)"


def test_masked():
    assert masked("SERPER_API_KEY", "") == "(set, empty)"
    assert masked("MARS_INDEX", "/data/idx") == "/data/idx"
    assert masked("MARS_HUB_TOKEN", "abc") == "(set, 3 characters)"


def complete(words: str, cword: int) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_MARS_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(cword)}
    p = subprocess.run([sys.executable, "-m", "mars_cli"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_shell_completion():
    assert complete("mars cr", 1) == ["crop"]
    assert complete("mars data con", 2) == ["convert"]
    assert "--units" in complete("mars crop --un", 2)
    r = Ran(["--help"])
    assert "--install-completion" in r.stdout and "--show-completion" in r.stdout


@pytest.mark.parametrize("version", ["standard", "editable"])
def test_wheels_install_the_man_pages(tmp_path, version):
    builders = pytest.importorskip("hatchling.builders.wheel")
    if version == "editable":
        pytest.importorskip("editables")  # what hatchling builds editable wheels with
    builder = builders.WheelBuilder(str(ROOT))
    (wheel,) = list(builder.build(directory=str(tmp_path), versions=[version]))
    names = zipfile.ZipFile(wheel).namelist()
    data = "mars_cli-0.1.0.data/data/share/man/"
    pages = sorted(p.name for p in (ROOT / "man").glob("mars*.1"))
    assert pages and all(f"{data}man1/{p}" in names for p in pages)
    assert f"{data}man5/mars-records.5" in names
