"""An 8K photo gets a generated turn with the official pixel limits and 16K/16K budgets.

An 8064×5241 photo is resized to at most 8,294,400 pixels (the official max), about 8K
image tokens on Qwen3-VL and 10.6K on Qwen2.5-VL, so it fits a 16,384-token prompt budget
and leaves the response budget whole. Under one 16K total budget and the checkpoints' own
max pixels it would not get a single turn.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mars_cli.main import app

OFFICIAL = ["--min-pixels", "65536", "--max-pixels", "8294400", "--max-prompt-tokens", "16384", "--max-response-tokens", "16384"]


def _has_budget_flags() -> bool:
    res = CliRunner().invoke(app, ["rollout", "--help"], terminal_width=200)
    return all(f in res.output for f in ("--max-prompt-tokens", "--max-response-tokens", "--min-pixels", "--max-pixels"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real-size (8064×5241) photo-like JPEG: gradients and texture, 42 megapixels."""
    h, w = 5241, 8064
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], -1) + rng.normal(0, 8, (h, w, 1)).astype(np.float32)
    path = tmp_path_factory.mktemp("photo") / "street-8k.jpg"
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
    return str(path)


@pytest.mark.slow  # ~30-60 s per model on two CPU cores: the vision tower sees 32K-42K patches
@pytest.mark.parametrize("model", ["tiny_policy_dir", "tiny_qwen3_dir"])
def test_an_8k_photo_gets_a_generated_turn(model, photo, tmp_path, request):
    if not _has_budget_flags():
        pytest.skip("rollout has no --max-prompt-tokens/--max-response-tokens/--min-pixels/--max-pixels yet")
    policy = request.getfixturevalue(model)
    task = {"schema_version": 1, "id": "8k", "question": "What is written on the shop sign?", "images": [photo],
            "answers": ["x"]}
    args = ["rollout", "--policy", str(policy), *OFFICIAL, "--max-turns", "1", "--max-new-tokens", "4",
            "--sampling", "greedy", "--artifacts", str(tmp_path / "art")]
    res = CliRunner().invoke(app, args, input=json.dumps(task) + "\n")
    assert res.exit_code == 0, res.output
    (rec,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert rec["turns"] == 1 and sum(rec["tokens"]["mask"]) >= 1, rec.get("finish")
    assert rec["policy"]["pixels"] == {"min": 65536, "max": 8294400}
