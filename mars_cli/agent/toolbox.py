"""Runs one parsed tool call of an episode and turns the outcome into a tool message.

The toolbox owns the tools' configuration (artifacts folder, search objects) and is shared
by all episodes; what belongs to one episode (its images, where each crop came from) is
passed in, so calls of different episodes run safely on several threads at once.

Crop provenance: every crop this toolbox makes is remembered as (original image, region of
the original it shows). A zoom into a crop is composed onto the original and cut from it,
never from the saved (downscaled, re-encoded) crop, so detail is not lost by zooming twice.

A failing call (ToolError from a search backend, a bad image or box) becomes an error tool
message the model can read; the episode goes on.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mars_cli import protocol, streams
from mars_cli.errors import MarsError, ToolError


@dataclass
class Outcome:
    """What a tool call produced: the tool message and its `tool_calls` entry fields."""

    message: dict
    ok: bool
    error: str | None
    latency: float
    detail: dict = field(default_factory=dict)  # for traces: crop box, result titles…


@dataclass
class EpisodeState:
    """What the toolbox needs to know of one episode."""

    task: dict
    # crop path -> (original image, normalized region of the original the crop shows)
    provenance: dict = field(default_factory=dict)


class Toolbox:
    """The three tools, configured once for a run."""

    def __init__(self, artifacts: str | os.PathLike, *, text_search=None, image_search=None, k: int = 5,
                 image_k: int = 5, crop_max_pixels: int | None = None, text_budget_chars: int = 3000):
        self.artifacts = Path(artifacts)
        self.text_search = text_search
        self.image_search = image_search
        self.k = k
        self.image_k = image_k
        self.crop_max_pixels = crop_max_pixels
        self.text_budget_chars = text_budget_chars

    def run(self, call: protocol.ToolCall, messages: list[dict], state: EpisodeState) -> Outcome:
        """Execute `call` against the conversation `messages`; never raises for tool failures."""
        t0 = time.perf_counter()
        try:
            if call.name == protocol.ZOOM:
                message, detail = self._zoom(call.arguments, messages, state)
            elif call.name == protocol.TEXT_SEARCH:
                message, detail = self._text(call.arguments)
            elif call.name == protocol.IMAGE_SEARCH:
                message, detail = self._image(call.arguments, messages, state)
            else:
                raise ToolError(f"unknown tool {call.name!r}")
        except (ToolError, MarsError, ValueError, OSError) as e:
            # The model reads the reason and may retry; the record keeps it in tool_calls.
            text = str(e) or type(e).__name__
            return Outcome(protocol.error_message(text, call.name), False, text, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 — a bug in a tool must not end a long rollout
            text = f"internal error in {call.name}: {type(e).__name__}: {e}"
            streams.warn(text)
            return Outcome(protocol.error_message(f"the {call.name} tool failed", call.name), False, text,
                           time.perf_counter() - t0)
        return Outcome(message, True, None, time.perf_counter() - t0, detail)

    # --- the tools -------------------------------------------------------------------

    @staticmethod
    def _pick_image(args: dict, messages: list[dict]) -> str:
        images = protocol.message_images(messages)
        idx = args.get("img_idx", 0)
        if not images:
            raise ToolError("there is no image in this conversation")
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(images):
            raise ToolError(f"img_idx {idx!r} is out of range: the conversation has {len(images)} image"
                            f"{'s' if len(images) != 1 else ''} (0 to {len(images) - 1})")
        return images[idx]

    def _zoom(self, args: dict, messages: list[dict], state: EpisodeState):
        from mars_cli.tools.crop import compose_box, covered_box, crop_image

        src = self._pick_image(args, messages)
        box = protocol.bbox_to_unit(args["bbox_2d"])
        origin, region = state.provenance.get(src, (src, None))
        full_box = compose_box(region, box) if region is not None else box
        res = crop_image(origin, full_box, out_dir=self.artifacts, clamp=True, max_pixels=self.crop_max_pixels)
        state.provenance[res["path"]] = (origin, covered_box(res))
        msg = protocol.tool_message(protocol.ZOOM, protocol.ZOOM_HEADER, [res["path"]])
        return msg, {"source": origin, "box": [round(v, 6) for v in full_box], "box_px": res["box_px"], "path": res["path"]}

    def _text(self, args: dict):
        if self.text_search is None:
            raise ToolError("text search is not available in this run (no search backend configured)")
        from mars_cli.tools.text_search import render_text_results

        query = args["query"]
        results = self.text_search.search(query, k=self.k)
        text = render_text_results(query, results, budget_chars=self.text_budget_chars)
        return protocol.tool_message(protocol.TEXT_SEARCH, text), {"titles": [r.get("title") for r in results]}

    def _image(self, args: dict, messages: list[dict], state: EpisodeState):
        if self.image_search is None:
            raise ToolError("image search is not available in this run (no image search backend configured)")
        from mars_cli.tools.image_search import render_image_results

        src = self._pick_image(args, messages)
        results = self.image_search.search(src, k=self.image_k, task=state.task)
        text, thumbs = render_image_results(results)
        parts = interleave(text, thumbs)
        return protocol.tool_message_parts(protocol.IMAGE_SEARCH, parts), {"titles": [r.get("title") for r in results]}


_THUMB = re.compile(r"^Thumbnail (\d+):", re.MULTILINE)


def interleave(text: str, thumbs: list[str]) -> list[dict]:
    """Message parts with the k-th thumbnail placed right after the k-th `Thumbnail n:` line.

    (Results without a thumbnail have no such line, so the order, not n, pairs them.)
    Thumbnails the text does not announce go at the end, so none is ever dropped.
    """
    parts: list[dict] = []
    pos = 0
    k = 0
    for m in _THUMB.finditer(text):
        if k >= len(thumbs):
            break
        parts.append({"type": "text", "text": text[pos:m.end()]})
        parts.append({"type": "image", "image": str(thumbs[k])})
        k += 1
        pos = m.end()
    if pos < len(text) or not parts:
        parts.append({"type": "text", "text": text[pos:]})
    parts.extend({"type": "image", "image": str(t)} for t in thumbs[k:])
    return parts
