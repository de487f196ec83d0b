"""`mars rollout --check`: verify a trajectory's tokens against its messages.

The stored ids must be exactly: the rendered initial prompt (system + question, then the
assistant header), then for each turn the ids the policy generated (mask 1) followed by the
template tokens of the tool result (Renderer.continuation, mask 0); decoding a turn's
generated ids must give the assistant message's text; the image list must be the
conversation's images in order; log-probs must be 0 on template tokens and finite and
≤ 0 on generated ones. This is what `update` relies on to train on what was sampled.
"""

from __future__ import annotations

import math

from mars_cli import protocol
from mars_cli.engines import decode_ids, strip_eos


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive mask-1 tokens."""
    spans, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(mask)))
    return spans


def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def check_trajectory(rec: dict, renderer: protocol.Renderer) -> list[str]:
    """Problems found in a trajectory record's tokens (empty when it is consistent)."""
    toks = rec.get("tokens")
    if toks is None:
        return ["tokens is null (a chat-API trajectory has nothing to check)"]
    ids, mask, lps = toks.get("ids") or [], toks.get("mask") or [], toks.get("logprobs")
    problems: list[str] = []
    if len(ids) != len(mask) or (lps is not None and len(lps) != len(ids)):
        return [f"ids, mask and logprobs differ in length ({len(ids)}, {len(mask)}, {len(lps or [])})"]
    msgs = rec.get("messages") or []
    first = next((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), len(msgs))
    expected, _, _ = renderer.render(msgs[:first], add_generation_prompt=True)
    if ids[: len(expected)] != expected:
        problems.append(f"the initial prompt differs from the rendered messages at token {_first_diff(ids, expected)}")
        return problems
    if any(mask[: len(expected)]):
        problems.append("prompt tokens are marked as generated (mask 1)")
    runs = _runs(mask)
    turns = [i for i in range(first, len(msgs)) if msgs[i].get("role") == "assistant"]
    if len(runs) != len(turns):
        problems.append(f"{len(turns)} assistant turns but {len(runs)} generated spans in the mask")
        return problems
    cursor = len(expected)
    eos = renderer.sp["im_end"]
    for k, (a, (start, end)) in enumerate(zip(turns, runs), 1):
        if start != cursor:
            problems.append(f"turn {k}: generated ids start at token {start}, expected {cursor}")
            return problems
        body, ended = strip_eos(ids[start:end], eos)
        text = decode_ids(renderer.tok, body)
        if text != msgs[a].get("content"):
            problems.append(f"turn {k}: decoding the generated ids does not give the assistant message text")
        cursor = end
        tail = []
        for m in msgs[a + 1:]:
            if m.get("role") == "assistant":
                break
            tail.append(m)
        if tail:
            cont, _, _ = renderer.continuation(tail, ended_with_eos=ended)
            got = ids[cursor: cursor + len(cont)]
            if got != cont:
                problems.append(f"turn {k}: the tool result's template tokens differ at token {cursor + _first_diff(got, cont)}")
                return problems
            cursor += len(cont)
    if cursor != len(ids):
        problems.append(f"{len(ids) - cursor} tokens after the last turn are not accounted for")
    images = protocol.message_images(msgs)
    if toks.get("images") is not None and list(toks["images"]) != images:
        problems.append("tokens.images is not the conversation's images in order")
    if ids.count(renderer.sp["image_pad"]) != len(images):
        problems.append(f"{ids.count(renderer.sp['image_pad'])} image placeholders for {len(images)} images")
    if lps is not None:
        if any(lp != 0.0 for lp, m in zip(lps, mask) if not m):
            problems.append("non-zero log-probs on template tokens (mask 0)")
        if any(not (isinstance(lp, (int, float)) and math.isfinite(lp) and lp <= 1e-6) for lp, m in zip(lps, mask) if m):
            problems.append("generated tokens have log-probs that are not finite values <= 0")
    return problems
