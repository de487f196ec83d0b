"""Helpers the format modules share: ids, answer lists, option shuffling, prompt text."""

from __future__ import annotations

import json
import random
import re
import string
from typing import Any

from mars_cli.eval.convert import RowError

_IMAGE_TAG = re.compile(r"<image>\s*")


def text(row: dict, *keys: str, required: bool = True) -> str | None:
    """The first non-empty string among `keys`."""
    for k in keys:
        v = row.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    if required:
        raise RowError(f"missing {' or '.join(repr(k) for k in keys)}")
    return None


def answer_list(*values: Any) -> list[str]:
    """Gold answers from strings, lists, or JSON-encoded lists; de-duplicated, in order."""
    out: list[str] = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, str):
            s = v.strip()
            if s.startswith("[") and s.endswith("]"):
                try:
                    parsed = json.loads(s)
                except json.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, list):
                    out.extend(answer_list(*parsed))
                    continue
            if s:
                out.append(s)
        elif isinstance(v, (list, tuple)):
            out.extend(answer_list(*v))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(str(v))
    seen: set = set()
    return [a for a in out if not (a in seen or seen.add(a))]


def prompt_text(prompt: Any) -> str:
    """A question from a prompt string or a chat list, with <image> tags removed."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise RowError("prompt has no user message")
        content = users[-1].get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        prompt = content
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError("prompt is empty")
    return _IMAGE_TAG.sub("", prompt).strip()


def shuffled_options(options: list[str], correct: int, key: str, seed: int) -> tuple[list[str], str]:
    """Options in a seeded random order (per task) and the correct option's new letter."""
    order = list(range(len(options)))
    random.Random(f"{seed}:{key}").shuffle(order)
    return [options[i] for i in order], string.ascii_uppercase[order.index(correct)]


_LABEL = re.compile(r"^\s*\(?([A-J])[).:]\s*")


def strip_label(option: str) -> str:
    """`(A) red` / `A. red` → `red`."""
    return _LABEL.sub("", str(option)).strip()


def images_of(value: Any) -> list:
    """One image or a list of them (numpy arrays from parquet become lists)."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]
