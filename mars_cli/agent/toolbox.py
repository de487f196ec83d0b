"""Runs one parsed tool call of an episode and turns the outcome into a tool message.

The toolbox owns the tools' configuration (artifacts folder, search objects) and is shared
by all episodes; what belongs to one episode (its images, where each crop came from) is
passed in, so calls of different episodes run safely on several threads at once.

Crop provenance: every crop this toolbox makes is remembered as (original image, region of
the original it shows). A zoom into a crop is composed onto the original and cut from it,
never from the saved (downscaled, re-encoded) crop, so detail is not lost by zooming twice.

A failing call (ToolError from a search backend, a bad image or box) becomes an error tool
message the model can read; the episode goes on. `Outcome.infra` says whether a failure is
the infrastructure's (a backend error, a replay miss, no stored image results, an image that
cannot be read) rather than the model's (a box outside the image, an img_idx out of range):
the format reward ignores infrastructure failures, as the official reward does.

Profiles (protocol.PROFILES) are read as data: `official` profiles use the released
result strings (zoom text, "Reverse Image Search Results:" with at most five results, the
search summary format, "No matching images were found."), `texts` gives the error texts,
`tool_text_limit` the cut of long text (the training loop's 8,192 characters), `crop` the
crop rule (tools/crop_official.py: the model's view, or the full-resolution original as
inference/eval.py cuts it, img_idx ignored and `bbox` accepted). Under `mars` crops come
from the full-resolution source (with provenance) and results use mars's layouts.

`Outcome.fatal`: a call the official evaluation cannot run at all (arguments that are not
an object, an inverted box): it fails the sample there, so the episode ends `error`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mars_cli import protocol, sensenova, streams
from mars_cli.errors import MarsError, ToolError


class ModelFault(ToolError):
    """A call the model got wrong (its arguments), as opposed to a failing backend."""


@dataclass
class Outcome:
    """What a tool call produced: the tool message and its `tool_calls` entry fields."""

    message: dict
    ok: bool
    error: str | None
    latency: float
    detail: dict = field(default_factory=dict)  # for traces: crop box, result titles…
    infra: bool = False  # the failure (or empty result) is the infrastructure's, not the model's
    fatal: str | None = None  # the episode cannot go on (the official evaluation fails the sample)


@dataclass
class EpisodeState:
    """What the toolbox needs to know of one episode."""

    task: dict
    # crop path -> (original image, normalized region of the original the crop shows)
    provenance: dict = field(default_factory=dict)


class Toolbox:
    """The three tools, configured once for a run."""

    def __init__(self, artifacts: str | os.PathLike, *, text_search=None, image_search=None, k: int = 5,
                 image_k: int = 5, crop_max_pixels: int | None = None, text_budget_chars: int = 3000,
                 profile: str = protocol.DEFAULT_PROFILE, min_pixels: int = sensenova.MIN_PIXELS,
                 max_pixels: int = sensenova.MAX_PIXELS, factor: int = 32):
        """`min_pixels`/`max_pixels`/`factor` (patch × merge: 28 for Qwen2.5-VL, 32 for
        Qwen3-VL) are the model view the sensenova crop rule works on."""
        self.artifacts = Path(artifacts)
        self.text_search = text_search
        self.image_search = image_search
        self.k = k
        self.image_k = image_k
        self.crop_max_pixels = crop_max_pixels
        self.text_budget_chars = text_budget_chars
        self.prof = protocol.get_profile(profile)
        self.profile = self.prof.name
        self.official = self.prof.official
        self.texts = self.prof.texts
        self.min_pixels, self.max_pixels, self.factor = int(min_pixels), int(max_pixels), int(factor)

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
                raise ModelFault(self.texts["unknown_tool"].format(call.name) if "unknown_tool" in self.texts
                                 else f"unknown tool {call.name!r}")
        except _Fatal as f:
            return Outcome(protocol.tool_message(call.name, str(f)), False, str(f), time.perf_counter() - t0, fatal=str(f))
        except _Observed as o:  # an official "empty" result: a normal message, not the model's fault
            return Outcome(protocol.tool_message(call.name, o.text), True, None, time.perf_counter() - t0,
                           {"empty": True}, infra=True)
        except (ToolError, MarsError, ValueError, OSError) as e:
            # The model reads the reason and may retry; the record keeps it in tool_calls.
            text = str(e) or type(e).__name__
            shown = text if not self.official or text.startswith("Error: ") else f"Error: {text}"
            message = protocol.tool_message(call.name, shown) if self.official else protocol.error_message(text, call.name)
            return Outcome(message, False, text, time.perf_counter() - t0, infra=not isinstance(e, ModelFault))
        except Exception as e:  # noqa: BLE001 — a bug in a tool must not end a long rollout
            text = f"internal error in {call.name}: {type(e).__name__}: {e}"
            streams.warn(text)
            return Outcome(protocol.error_message(f"the {call.name} tool failed", call.name), False, text,
                           time.perf_counter() - t0, infra=True)
        if self.prof.tool_text_limit is not None:
            _cut_texts(message, self.prof.tool_text_limit)
        return Outcome(message, True, None, time.perf_counter() - t0, detail)

    # --- the tools -------------------------------------------------------------------

    def _pick_image(self, args: dict, messages: list[dict]) -> str:
        images = protocol.message_images(messages)
        idx = args.get("img_idx", 0)
        if isinstance(idx, float) and idx.is_integer():  # the official schema types it "number"
            idx = int(idx)
        if not images:
            raise ModelFault("Error: No images available for zooming." if self.official
                             else "there is no image in this conversation")
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(images):
            if self.official:
                raise ModelFault(f"Error: Image at index {idx} not found. Available images: {len(images)}")
            raise ModelFault(f"img_idx {idx!r} is out of range: the conversation has {len(images)} image"
                             f"{'s' if len(images) != 1 else ''} (0 to {len(images) - 1})")
        return images[idx]

    def _zoom(self, args: dict, messages: list[dict], state: EpisodeState):
        from mars_cli.tools.crop import check_box, compose_box, covered_box, crop_image

        if self.prof.crop == "original":
            return self._zoom_original(args, messages)
        src = self._pick_image(args, messages)
        if self.official:
            return self._zoom_official(src, args)
        box = protocol.bbox_to_unit(args["bbox_2d"])
        origin, region = state.provenance.get(src, (src, None))
        full_box = compose_box(region, box) if region is not None else box
        try:
            check_box(full_box, clamp=True)
        except MarsError as e:
            raise ModelFault(str(e)) from None
        res = crop_image(origin, full_box, out_dir=self.artifacts, clamp=True, max_pixels=self.crop_max_pixels)
        state.provenance[res["path"]] = (origin, covered_box(res))
        msg = protocol.tool_message(protocol.ZOOM, protocol.ZOOM_HEADER, [res["path"]])
        return msg, {"source": origin, "box": [round(v, 6) for v in full_box], "box_px": res["box_px"], "path": res["path"]}

    def _zoom_official(self, src: str, args: dict):
        from mars_cli.tools.crop_official import crop_model_view

        problem = sensenova.zoom_error({**args, "img_idx": 0}, 1)  # the index was checked above
        if problem:
            raise ModelFault(problem)
        res = crop_model_view(src, args.get("bbox_2d") or args.get("bbox"), out_dir=self.artifacts, factor=self.factor,
                              min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        msg = protocol.tool_message(protocol.ZOOM, sensenova.ZOOM_TEXT, [res["path"]])
        return msg, {"source": src, "box": [round(v, 6) for v in res["box"]], "box_px": res["box_px"], "path": res["path"]}

    def _zoom_original(self, args, messages: list[dict]):
        """eval.py's zoom (eval.py:1483-1508): the task's first image, `bbox_2d` or `bbox`."""
        from mars_cli.tools.crop_official import crop_original

        if not isinstance(args, dict):
            raise _Fatal(f"the {protocol.ZOOM} arguments are not a JSON object")
        bbox = args.get("bbox_2d") or args.get("bbox")
        try:
            well_formed = bool(bbox) and len(bbox) == 4
        except TypeError:
            raise _Fatal(f"the zoom box {bbox!r} has no length") from None
        if not well_formed:
            raise ModelFault(self.texts["invalid_bbox"])
        originals = protocol.message_images(messages)
        if not originals:
            raise _Fatal("the task has no image to zoom into")
        try:
            res = crop_original(originals[0], bbox, out_dir=self.artifacts, factor=self.factor,
                                min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except (TypeError, ValueError, MarsError) as e:
            raise _Fatal(f"the zoom box {bbox!r} cannot be cut: {e}") from None
        msg = protocol.tool_message(protocol.ZOOM, sensenova.ZOOM_TEXT, [res["path"]])
        return msg, {"source": originals[0], "box": [round(float(v), 6) for v in res["box"]], "box_px": res["box_px"],
                     "path": res["path"]}

    def _text(self, args: dict):
        unavailable = self.texts.get("search_unavailable")
        if self.prof.parse == "call-first":  # eval.py:1511-1532: no argument checks, no query → unavailable
            if not isinstance(args, dict):
                raise _Fatal(f"the {protocol.TEXT_SEARCH} arguments are not a JSON object")
            if not args.get("query", ""):
                raise ModelFault(unavailable)
        if self.text_search is None:
            raise ToolError(unavailable or "text search is not available in this run (no search backend configured)")
        from mars_cli.tools.text_search import render_text_results

        query = "{}".format(args["query"])
        results = self.text_search.search(query, k=self.k)
        titles = {"titles": [r.get("title") for r in results]}
        summary = results[0].get("query_summary") if results else None
        if self.official and summary:
            return protocol.tool_message(protocol.TEXT_SEARCH, sensenova.text_search_result(query, summary)), titles
        # Without a summarizer there is no official layout: the official tool always summarizes.
        budget = sensenova.TOOL_TEXT_LIMIT * 4 if self.official else self.text_budget_chars
        text = render_text_results(query, results, budget_chars=budget)
        return protocol.tool_message(protocol.TEXT_SEARCH, text), titles

    def _image(self, args: dict, messages: list[dict], state: EpisodeState):
        if self.image_search is None:
            if self.official:
                raise _Observed(sensenova.IMAGE_SEARCH_EMPTY)
            raise ToolError("image search is not available in this run (no image search backend configured)")
        from mars_cli.tools.image_search import render_image_results

        src = protocol.message_images(messages)[0] if self.prof.crop == "original" else self._pick_image(args, messages)
        if not self.official:
            results = self.image_search.search(src, k=self.image_k, task=state.task)
            text, thumbs = render_image_results(results)
            parts = interleave(text, thumbs)
            return protocol.tool_message_parts(protocol.IMAGE_SEARCH, parts), {"titles": [r.get("title") for r in results]}
        try:
            results = self.image_search.search(src, k=min(self.image_k, sensenova.IMAGE_SEARCH_MAX), task=state.task)
        except ToolError:
            # The official tool answers a search without stored results this way (a success).
            raise _Observed(sensenova.IMAGE_SEARCH_EMPTY) from None
        results = results[: sensenova.IMAGE_SEARCH_MAX]
        if not results:
            raise _Observed(sensenova.IMAGE_SEARCH_EMPTY)
        parts: list[dict] = [{"type": "text", "text": sensenova.IMAGE_SEARCH_HEAD}]
        for n, r in enumerate(results, 1):
            parts.append({"type": "text", "text": sensenova.image_search_entry(n, str(r.get("title") or ""))})
            if r.get("thumbnail"):
                parts.append({"type": "image", "image": str(r["thumbnail"])})
        return protocol.tool_message_parts(protocol.IMAGE_SEARCH, parts), {"titles": [r.get("title") for r in results]}


class _Fatal(Exception):
    """A call the official evaluation cannot run: the episode ends `error`."""


class _Observed(Exception):
    """An official result text that reports nothing found (sent to the model as a result)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _cut_texts(message: dict, limit: int) -> None:
    """The training loop's cut of long tool text (each text part, keeping its end)."""
    for part in message.get("content") or []:
        if part.get("type") == "text" and len(part.get("text", "")) > limit:
            part["text"] = sensenova.cut_tool_text(part["text"], limit)


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
