"""The exact first-turn text a model sees, per protocol profile (`mars prompt`).

For each task the prompt is rendered the way an episode starts (protocol.initial_messages,
then protocol.Renderer to token ids) and decoded back to text, so what is printed is what
the policy receives: ChatML with one `<|vision_start|><|image_pad|><|vision_end|>` per image
(the processor expands each pad to the image's patch count later).

Without a policy the real Qwen vocabulary is used (built offline by models/qwen_vocab.py and
cached under ~/.cache/mars/qwen-vocab/): the text does not depend on the checkpoint, only the
token count would differ for a checkpoint with another vocabulary. With a policy whose
tokenizer has a chat template, the template's own rendering of the same messages is
compared too (`chat_template_equal`), which checks that mars renders what the checkpoint's
template would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from mars_cli import protocol
from mars_cli.errors import MarsError
from mars_cli.records import task_view, validate

DEFAULT_ARCH = "qwen3-vl"


def vocab_dir(arch: str = DEFAULT_ARCH) -> Path:
    """A tokenizer directory with the real Qwen vocabulary (written once, then reused)."""
    from mars_cli.fsutil import atomic_dir
    from mars_cli.models import qwen_vocab
    from mars_cli.models.tiny import CHAT_TEMPLATE

    base = Path(os.environ.get("MARS_CACHE_HOME") or Path.home() / ".cache" / "mars") / "qwen-vocab" / arch
    if not (base / "tokenizer.json").is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(base) as tmp:
            qwen_vocab.write_tokenizer_files(tmp, arch, CHAT_TEMPLATE)
    return base


class PromptRenderer:
    """Renders first prompts with one tokenizer (a policy's, or the Qwen vocabulary)."""

    def __init__(self, policy: str | None = None, *, profile: str = protocol.DEFAULT_PROFILE,
                 system_prompt: str | None = None, arch: str = DEFAULT_ARCH, min_pixels: int | None = None,
                 max_pixels: int | None = None):
        from mars_cli.models.load import load_tokenizer, special_ids

        prof = protocol.get_profile(profile)
        self.profile = prof.name
        self.system_prompt = system_prompt
        if prof.pixels is not None:  # the profile's view (sensenova-eval), where no flag gave one
            min_pixels, max_pixels = min_pixels or prof.pixels[0], max_pixels or prof.pixels[1]
        path = Path(policy) if policy else vocab_dir(arch)
        self.tokenizer = load_tokenizer(path)
        self.renderer = protocol.Renderer(self.tokenizer, special_ids(self.tokenizer, path))
        self.source = str(policy) if policy else f"qwen-vocab:{arch}"
        self.has_template = bool(policy) and bool(getattr(self.tokenizer, "chat_template", None))
        self.vision = None  # with a policy: its image processor, to count each image's tokens
        if policy:
            from types import SimpleNamespace

            from mars_cli.models.load import load_image_processor

            proc = load_image_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
            self.vision = SimpleNamespace(image_processor=proc)
            self.pixels = {"min": int(proc.size["shortest_edge"]), "max": int(proc.size["longest_edge"])}

    def messages(self, task: dict) -> list[dict]:
        return protocol.initial_messages(task_view(task), profile=self.profile, system_prompt=self.system_prompt)

    def record(self, task: dict) -> dict:
        messages = self.messages(task)
        ids, _, images = self.renderer.render(messages, add_generation_prompt=True)
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out = {"id": task["id"], "protocol": self.profile, "prompt": text, "tokens": len(ids),
               "images": images, "tokenizer": self.source}
        if self.vision is not None:
            from mars_cli.models.inputs import image_tokens

            # what the model input holds once each placeholder is expanded to the image's patches
            out["input_tokens"] = len(ids) - len(images) + sum(image_tokens(self.vision, im) for im in images)
            out["pixels"] = self.pixels
        if self.has_template:
            out["chat_template_equal"] = self._template_text(messages) == text
        return out

    def _template_text(self, messages: list[dict]) -> str | None:
        hf = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
               [{"type": "image"} if p.get("type") == "image" else {"type": "text", "text": p.get("text", "")}
                for p in m["content"]]} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 — a template that cannot render these messages compares unequal
            return None


def prompt_records(located: Iterable, renderer: PromptRenderer) -> Iterator[dict]:
    """(where, task record) pairs → one prompt record each."""
    for where, rec in located:
        validate(rec, "task", where)
        try:
            out = renderer.record(rec)
        except MarsError as e:  # a task the profile refuses (no dataset system prompt), an image
            raise MarsError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise MarsError(f"{where}: cannot render this task ({type(e).__name__}: {e})") from None
        yield out
