"""A readable trace of an episode for a person (`mars ask`): written to stderr as it happens.

    turn 1
      thinking  The sign is too small to read; zoom in on the upper left.
      call      image_zoom_in_tool {"bbox_2d": [80, 40, 420, 300], "label": "sign"}
      crop      box (0.080, 0.040, 0.420, 0.300) of photo.jpg = pixels [307, 86, 1613, 648] -> artifacts/3f2a….jpg
    turn 2
      thinking  …
      answer    STOP
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading

from mars_cli import protocol

WIDTH = 100
THINKING_CHARS = 1200  # long chains of thought are cut; --json keeps them whole


class Tracer:
    """The AgentLoop `on_turn` callback that prints each turn."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()  # tool results arrive on worker threads

    def _field(self, label: str, text: str) -> list[str]:
        lines = textwrap.wrap(" ".join(str(text).split()), WIDTH - 12) or [""]
        return [f"  {label:<9} {lines[0]}"] + [f"  {'':<9} {x}" for x in lines[1:]]

    def __call__(self, ep, turn: protocol.Turn, outcome) -> None:
        out = [f"turn {ep.turns}"]
        if turn.thinking:
            think = turn.thinking if len(turn.thinking) <= THINKING_CHARS else turn.thinking[:THINKING_CHARS] + " …"
            out += self._field("thinking", think)
        if turn.answer is not None:
            out += self._field("answer", turn.answer)
        elif turn.call is not None:
            out += self._field("call", f"{turn.call.name} {json.dumps(turn.call.arguments, ensure_ascii=False)}")
        elif turn.error is not None:
            out += self._field("malformed", turn.error)
        else:
            text = ep.messages[-1]["content"] if ep.messages and ep.messages[-1]["role"] == "assistant" else ""
            shown = " ".join(text.split())[:300] or repr(text[:60])
            out += self._field("no action", shown)
        if outcome is not None:
            out += self._outcome(outcome)
        with self._lock:
            self.stream.write("\n".join(out) + "\n")
            self.stream.flush()

    def _outcome(self, o) -> list[str]:
        if not o.ok:
            return self._field("error", o.error or "")
        d = o.detail
        if "box" in d:
            box = ", ".join(f"{v:.3f}" for v in d["box"])
            return self._field("crop", f"box ({box}) of {d['source']} = pixels {d['box_px']} -> {d['path']}")
        if "titles" in d:
            titles = "; ".join(str(t) for t in d["titles"][:5])
            return self._field("results", f"{len(d['titles'])}: {titles}") + self._field("latency", f"{o.latency:.2f} s")
        return []

    def summary(self, rec: dict) -> None:
        calls = rec.get("tool_calls") or []
        bad = sum(1 for c in calls if not c.get("ok"))
        line = (f"finish    {rec['finish']} after {rec.get('turns', 0)} turn{'s' if rec.get('turns', 0) != 1 else ''}, {len(calls)} tool call{'s' if len(calls) != 1 else ''}"
                f"{f' ({bad} failed)' if bad else ''}, {rec.get('elapsed', 0):.1f} s")
        if rec.get("error"):
            line += f": {rec['error']}"
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()
