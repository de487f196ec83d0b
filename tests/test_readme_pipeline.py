"""README.md's "A first pipeline", run as written (only the port changed), twice in a row.

The snippet is read out of README.md, so the README and this test cannot drift: it must
end by itself, with `tee` between every stage, after its `--max-steps 2` updates.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.network, pytest.mark.slow]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## A first pipeline\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_snippet_has_tee_between_every_stage_and_max_steps():
    snippet = readme_snippet()
    pipeline = snippet[snippet.index("mars rollout"):snippet.index("kill $SERVER")]
    stages = [p.strip() for p in pipeline.replace("\\\n", " ").split("|")]
    assert [s.split()[:2] for s in stages] == [["mars", "rollout"], ["tee", "first/trajectories.jsonl"],
                                                ["mars", "judge"], ["tee", "first/judged.jsonl"], ["mars", "advantage"],
                                                ["tee", "first/batches.jsonl"], ["mars", "update"]]
    assert "--max-steps 2" in stages[-1] and "--index first/index" in stages[0]


@pytest.mark.parametrize("run", [1, 2])
def test_readme_first_pipeline_ends_by_itself(tmp_path, run):
    snippet = readme_snippet().replace("8100", str(free_port()))
    # `mars` as an installed entry point would run it: this interpreter and this checkout
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mars").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mars_cli "$@"\n')
    (bin_dir / "mars").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARS_") and "API_KEY" not in k}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    updates = [json.loads(x) for x in (tmp_path / "first" / "updates.jsonl").read_text().splitlines()]
    assert [u["step"] for u in updates] == [1, 2] and all(u["push"]["ok"] for u in updates)
    assert (tmp_path / "first" / "ckpts" / "step-2").is_dir()
    err = p.stderr
    assert "text search is off" not in err
    for line in ("mars rollout: the trainer ended: no new weights will come", "mars update: follow: 2 steps in ",
                 "mars advantage: ", "mars judge: "):
        assert line in err, (line, err[-3000:])
