"""Chat rendering straight to token ids, with the policy mask (Qwen ChatML).

Part of the agent protocol (mars_cli/protocol.py re-exports everything here): how a
conversation of protocol messages becomes the ids a policy reads, the same ids whether a
conversation is rendered whole or turn by turn.
"""

from __future__ import annotations

import re
from typing import Sequence

SPECIAL_NAMES = ("im_start", "im_end", "vision_start", "vision_end", "image_pad")
ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "image")  # what the template renders: no video, no audio, no image_url
# Template tags some Qwen tokenizers hold as added tokens (Qwen3-VL); inside the template
# they are those tokens, inside a tool's text they are just characters.
TEMPLATE_TAGS = ("<tool_response>", "</tool_response>")
_TAG_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in TEMPLATE_TAGS) + ")")


class Renderer:
    """Qwen ChatML rendering straight to token ids, with the policy mask.

    Text between special tokens is encoded as one piece, and the pieces are the same
    whether a conversation is rendered whole or turn by turn, so the ids a rollout builds
    incrementally equal the ids of rendering the finished conversation.

    Tool results are plain text: a web page containing `<|im_end|>` or `<|image_pad|>` is
    encoded as those characters, never as the special tokens, so it can neither end the
    turn early nor add an image placeholder (`plain`). Template text is encoded with the
    tokenizer's added tokens, as the chat template would be.
    """

    def __init__(self, tokenizer, special: dict):
        missing = [k for k in SPECIAL_NAMES if k not in special]
        if missing:
            raise ValueError(f"special token ids missing: {', '.join(missing)}")
        self.tok = tokenizer
        self.sp = special
        self._cache: dict[str, list[int]] = {}
        added = {}
        try:
            added = dict(tokenizer.get_added_vocab())
        except (AttributeError, NotImplementedError, TypeError):
            pass
        self._tags = {t: int(added[t]) for t in TEMPLATE_TAGS if t in added}

    def plain(self, s: str) -> list[int]:
        """Ids of `s` as ordinary text: no special or added token is recognised in it.

        Runs the fast tokenizer's own normalizer, pre-tokenizer and BPE model, skipping only
        its added-token matching, so text without special tokens encodes exactly as `text`.
        """
        if not s:
            return []
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None:  # a plain-Python tokenizer (tests' fakes) has no added tokens to skip
            return list(self.tok.encode(s, add_special_tokens=False))
        if backend.normalizer is not None:
            s = backend.normalizer.normalize_str(s)
        pieces = backend.pre_tokenizer.pre_tokenize_str(s) if backend.pre_tokenizer is not None else [(s, None)]
        ids: list[int] = []
        for piece, _ in pieces:
            ids.extend(t.id for t in backend.model.tokenize(piece))
        return ids

    def text(self, s: str) -> list[int]:
        if not s:
            return []
        ids = self._cache.get(s) if len(s) < 64 else None
        if ids is None:
            ids = list(self.tok.encode(s, add_special_tokens=False))
            if len(s) < 64:
                self._cache[s] = ids
        return ids

    def _content(self, content, ids: list[int], images: list[str], wrap: tuple[str, str] = ("", "")) -> None:
        """Append a message body: text pieces and one placeholder per image."""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        buf = wrap[0]
        for p in parts:
            if p.get("type") == "image":
                ids += self.text(buf)
                buf = ""
                ids += [self.sp["vision_start"], self.sp["image_pad"], self.sp["vision_end"]]
                images.append(str(p["image"]))
            else:
                buf += p.get("text", "")
        ids += self.text(buf + wrap[1])

    def _tool_content(self, content, ids: list[int], images: list[str]) -> None:
        """A tool result's body inside its template: the tool's text encoded as plain text."""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        run: list[str] = []

        def flush() -> None:
            ids.extend(self.plain("".join(run)))
            run.clear()

        def template(s: str) -> None:
            for piece in _TAG_SPLIT.split(s):
                if piece in self._tags:
                    flush()
                    ids.append(self._tags[piece])
                elif piece:
                    run.append(piece)

        template("user\n<tool_response>\n")
        for p in parts:
            if p.get("type") == "image":
                flush()
                ids += [self.sp["vision_start"], self.sp["image_pad"], self.sp["vision_end"]]
                images.append(str(p["image"]))
            else:
                run.append(p.get("text", ""))
        template("\n</tool_response>")
        flush()

    @staticmethod
    def check(m) -> None:
        """Refuse (ValueError) a message the template cannot render as it says: an unknown
        role, no content (null), a part that is neither text nor an image (video)."""
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {m.get('role') if isinstance(m, dict) else m!r}")
        content = m.get("content")
        if content is None:
            raise ValueError('content is null (an empty turn is "")')
        if isinstance(content, str):
            return
        if not isinstance(content, list):
            raise ValueError(f"content must be a string or a list of parts, got {type(content).__name__}")
        for p in content:
            kind = p.get("type", "text") if isinstance(p, dict) else None
            if kind not in PART_TYPES:
                raise ValueError(f"a content part of type {kind!r} cannot be rendered (only text and image parts)")
            if kind == "text" and not isinstance(p.get("text", ""), str) or kind == "image" and not isinstance(p.get("image"), str):
                raise ValueError(f"a {kind} part needs a string '{kind}' field")

    def message(self, m: dict) -> tuple[list[int], list[int], list[str]]:
        """One message with its header and <|im_end|>\\n; assistant content is mask 1."""
        role = m["role"]
        ids: list[int] = []
        images: list[str] = []
        if role == "tool":
            ids.append(self.sp["im_start"])
            self._tool_content(m.get("content"), ids, images)
            ids += [self.sp["im_end"]] + self.text("\n")
            return ids, [0] * len(ids), images
        head = [self.sp["im_start"]] + self.text(f"{role}\n")
        body: list[int] = []
        self._content(m.get("content"), body, images)
        tail = self.text("\n")
        if role == "assistant":
            mask = [0] * len(head) + [1] * (len(body) + 1) + [0] * len(tail)
        else:
            mask = [0] * (len(head) + len(body) + 1 + len(tail))
        return head + body + [self.sp["im_end"]] + tail, mask, images

    def generation_prompt(self) -> list[int]:
        return [self.sp["im_start"]] + self.text("assistant\n")

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> tuple[list[int], list[int], list[str]]:
        ids: list[int] = []
        mask: list[int] = []
        images: list[str] = []
        for m in messages:
            i, k, im = self.message(m)
            ids += i
            mask += k
            images += im
        if add_generation_prompt:
            g = self.generation_prompt()
            ids += g
            mask += [0] * len(g)
        return ids, mask, images

    def continuation(self, tail: Sequence[dict], *, ended_with_eos: bool = True) -> tuple[list[int], list[int], list[str]]:
        """Template tokens after a generated assistant turn: its end, tool results, next header.

        The generated ids of a turn end with <|im_end|> when the model stopped by itself;
        if generation stopped elsewhere (a stop string, the token budget) the end tag is
        added here as template (mask 0).
        """
        ids = ([] if ended_with_eos else [self.sp["im_end"]]) + self.text("\n")
        images: list[str] = []
        for m in tail:
            i, _, im = self.message(m)
            ids += i
            images += im
        ids += self.generation_prompt()
        return ids, [0] * len(ids), images


def render(messages, tokenizer, special: dict, *, add_generation_prompt: bool = True):
    """Messages → (ids, mask, images in placeholder order); see Renderer."""
    return Renderer(tokenizer, special).render(messages, add_generation_prompt=add_generation_prompt)


def render_continuation(messages_tail, tokenizer, special: dict, *, ended_with_eos: bool = True):
    """Template tokens appended after a generated assistant turn; all mask 0."""
    return Renderer(tokenizer, special).continuation(messages_tail, ended_with_eos=ended_with_eos)
