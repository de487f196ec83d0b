"""Batches for the training tests: scored trajectory records rendered with the real tokenizer.

DeepSpeed's JIT cache is pointed at one directory for the whole session (set at import,
before any engine starts), so an op compiled by one test is reused by the next.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("MARS_TORCH_EXTENSIONS", str(Path(tempfile.gettempdir()) / "mars-test-torch-extensions"))

from mars_cli import protocol  # noqa: E402
from mars_cli.jsonl import write_records  # noqa: E402
from mars_cli.records import SCHEMA_VERSION  # noqa: E402
from clirun import Ran  # noqa: F401  (the update and sft tests import it from here)

ANSWERS = ["a red square", "the blue car", "forty two", "Paris, in 1889"]


def make_image(path: Path, color=(200, 30, 30), size=(96, 64)) -> str:
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return str(path)


def trajectory(renderer, task_id: str, question: str, answer: str, images: list[str], *, advantage: float = 0.0,
               with_tokens: bool = True, logprobs: float | None = -1.0) -> dict:
    """A one-turn scored trajectory record whose tokens come from the protocol renderer."""
    task = {"id": task_id, "question": question, "images": images}
    # A short system prompt keeps the sequences (and the tests) small.
    messages = protocol.initial_messages(task, system_prompt="You answer questions about images.")
    messages.append({"role": "assistant", "content": protocol.format_assistant("I look at it.", answer=answer)})
    ids, mask, imgs = renderer.render(messages, add_generation_prompt=False)
    tokens = None
    if with_tokens:
        lp = [logprobs if m else 0.0 for m in mask] if logprobs is not None else None
        tokens = {"ids": ids, "mask": mask, "logprobs": lp, "images": imgs}
    return {"schema_version": SCHEMA_VERSION, "id": task_id, "question": question, "images": images,
            "answers": [answer], "group": task_id, "sample": 0, "messages": messages, "tool_calls": [],
            "prediction": answer, "finish": "answer", "tokens": tokens, "rewards": {"accuracy": 1.0},
            "reward": 1.0, "advantage": advantage}


def write_batch(policy_dir, out: Path, advantages, *, image_dir: Path | None = None, **kw) -> Path:
    """A batch file of len(advantages) trajectories (one image each when image_dir is given)."""
    from mars_cli.models.load import load_tokenizer, special_ids

    tok = load_tokenizer(policy_dir)
    renderer = protocol.Renderer(tok, special_ids(tok))
    recs = []
    for i, a in enumerate(advantages):
        images = []
        if image_dir is not None:
            images = [make_image(image_dir / f"img{i}.png", color=(40 * i % 255, 90, 160))]
        recs.append(trajectory(renderer, f"t{i}", f"What is shown in picture {i}?", ANSWERS[i % len(ANSWERS)],
                               images, advantage=a, **kw))
    write_records(recs, out)
    return out

