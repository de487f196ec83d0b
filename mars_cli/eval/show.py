"""Trajectories → one self-contained HTML page to look at episodes (`mars show`).

Per episode: the question, each question image with every zoom box drawn over it (boxes
from the zoom calls' bbox_2d, mapped through img_idx and, for a zoom into a crop, composed
back onto the original image), each turn's thinking, tool call and result (crops and
thumbnails inline), the answer, the gold and the rewards. Filters (benchmark, outcome,
text) are a small inline script; the URL hash keeps them (#benchmark=…&outcome=wrong).

Images are linked relative to the page with loading="lazy", so a page of thousands of
episodes opens fast; `embed=True` inlines downscaled JPEG thumbnails instead, for a
portable single file. Every string from a record is HTML-escaped; the script never turns
record data into markup.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

from mars_cli import streams
from mars_cli.errors import MarsError

CORRECT = 0.5


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


class ImageLinks:
    """How an image path from a record appears in the page: a relative link or a data URI."""

    def __init__(self, page_dir: Path, *, embed: bool = False, base: Path | None = None, max_side: int = 768):
        self.page_dir = page_dir.resolve()
        self.embed = embed
        self.base = base or Path.cwd()
        self.max_side = max_side
        self._cache: dict[tuple[str, int], str | None] = {}

    def src(self, path: str, max_side: int | None = None) -> str | None:
        """The src attribute for `path`, or None when it cannot be shown (missing, bad scheme)."""
        side = max_side or self.max_side
        key = (path, side)
        if key not in self._cache:
            self._cache[key] = self._src(path, side)
        return self._cache[key]

    def _src(self, path: str, side: int) -> str | None:
        if path.startswith(("http://", "https://")):
            return path
        if ":" in path.split("/", 1)[0] and not os.path.isabs(path):  # javascript:, data:, file: …
            return None
        p = Path(path)
        p = p if p.is_absolute() else self.base / p
        if not self.embed:
            return quote(os.path.relpath(p.resolve(), self.page_dir).replace(os.sep, "/"))
        if not p.is_file():
            return None
        from mars_cli.images import thumbnail_jpeg

        try:  # the bounded reader: mars's pixel limit, regular files only
            data = thumbnail_jpeg(p, side, quality=75)
        except MarsError as e:
            streams.warn(f"{e}; shown as missing")
            return None
        return "data:image/jpeg;base64," + base64.b64encode(data).decode()

    def img(self, path: str, cls: str, max_side: int | None = None) -> str:
        s = self.src(path, max_side)
        if s is None:
            return f'<span class="missing-img" title="{esc(path)}">image not available: {esc(Path(path).name)}</span>'
        return f'<img class="{cls}" src="{esc(s)}" loading="lazy" alt="{esc(Path(path).name)}" title="{esc(path)}">'


def zoom_boxes(messages: list[dict]) -> dict[int, list[dict]]:
    """Question-image index → the zoom boxes drawn on it: {"turn", "box" (unit), "label"}.

    Every image of the conversation has an origin (question image, region of it); a zoom
    on image img_idx is composed with that image's region, so a zoom into a crop lands
    where it belongs on the original. Search thumbnails have no origin: zooms on them are
    not drawn.
    """
    from mars_cli import protocol as P
    from mars_cli.tools.crop import compose_box

    origins: list[tuple[int, tuple] | None] = []
    boxes: dict[int, list[dict]] = {}
    pending = None
    turn = 0
    question_seen = False
    for m in messages:
        content = m.get("content")
        imgs = [p for p in content if isinstance(p, dict) and p.get("type") == "image"] if isinstance(content, list) else []
        role = m.get("role")
        if role == "user" and not question_seen:
            question_seen = True
            origins.extend((i, (0.0, 0.0, 1.0, 1.0)) for i in range(len(imgs)))
        elif role == "assistant":
            turn += 1
            pending = None
            t = P.parse_turn(content if isinstance(content, str) else "")
            if t.call is not None and t.call.name == P.ZOOM:
                idx = t.call.arguments.get("img_idx", 0)
                origin = origins[idx] if 0 <= idx < len(origins) else None
                if origin is not None:
                    box = compose_box(origin[1], P.bbox_to_unit(t.call.arguments["bbox_2d"]))
                    boxes.setdefault(origin[0], []).append({"turn": turn, "box": box, "label": t.call.arguments.get("label")})
                    pending = (origin[0], box)
        else:
            # A zoom's result image shows the zoomed region; anything else (thumbnails) has no origin.
            origins.extend(pending if (i == 0 and role == "tool" and m.get("name") == P.ZOOM) else None for i in range(len(imgs)))
    return boxes


def outcome(rec: dict) -> str:
    acc = (rec.get("rewards") or {}).get("accuracy") if isinstance(rec.get("rewards"), dict) else None
    if acc is None:
        return "missing"
    return "correct" if acc >= CORRECT else "wrong"


def _figure(links: ImageLinks, path: str, boxes: list[dict]) -> str:
    parts = [f'<figure class="src">{links.img(path, "main")}']
    for b in boxes:
        x0, y0, x1, y1 = (min(1.0, max(0.0, v)) for v in b["box"])
        style = f"left:{100 * x0:.3f}%;top:{100 * y0:.3f}%;width:{100 * (x1 - x0):.3f}%;height:{100 * (y1 - y0):.3f}%"
        tip = f"turn {b['turn']}" + (f": {b['label']}" if b.get("label") else "")
        parts.append(f'<div class="box" style="{style}" title="{esc(tip)}"><span>{esc(b["turn"])}</span></div>')
    parts.append("</figure>")
    return "".join(parts)


def _content_html(links: ImageLinks, content) -> str:
    if isinstance(content, str):
        return f"<pre>{esc(content)}</pre>"
    out = []
    for p in content or []:
        if not isinstance(p, dict):
            continue
        if p.get("type") == "image":
            out.append(links.img(str(p.get("image")), "inline", 320))
        elif p.get("text"):
            out.append(f"<pre>{esc(p['text'])}</pre>")
    return "".join(out)


def _turn_html(links: ImageLinks, m: dict, n: int) -> str:
    from mars_cli import protocol as P

    role = m.get("role")
    if role == "assistant":
        raw = m.get("content") if isinstance(m.get("content"), str) else json.dumps(m.get("content"))
        t = P.parse_turn(raw)
        body = []
        if t.thinking:
            body.append(f'<div class="thinking">{esc(t.thinking)}</div>')
        if t.call is not None:
            call = json.dumps({"name": t.call.name, "arguments": t.call.arguments}, ensure_ascii=False)
            body.append(f'<div class="call"><pre>{esc(call)}</pre></div>')
        elif t.answer is not None:
            body.append(f'<div class="answer">answer: {esc(t.answer)}</div>')
        else:
            why = t.error or "no action"
            body.append(f'<div class="err"><pre>{esc(why)}\n---\n{esc(raw)}</pre></div>')
        return f'<div class="turn"><div class="who">turn {n} · assistant</div>{"".join(body)}</div>'
    who = f"tool · {m.get('name')}" if role == "tool" else str(role)
    return f'<div class="turn"><div class="who">{esc(who)}</div>{_content_html(links, m.get("content"))}</div>'


def episode_html(rec: dict, links: ImageLinks) -> str:
    messages = rec.get("messages") or []
    users = [m for m in messages if m.get("role") == "user"]
    first = users[0] if users else {"content": [{"type": "text", "text": rec.get("question", "")}]}
    qimages = [p.get("image") for p in first.get("content") or [] if isinstance(p, dict) and p.get("type") == "image"] \
        if isinstance(first.get("content"), list) else []
    if not messages:
        qimages = list(rec.get("images") or [])
    boxes = zoom_boxes(messages) if messages else {}
    oc = outcome(rec)
    reward = rec.get("reward")
    bench = str(rec.get("benchmark") or "unknown")
    search = " ".join(str(x) for x in (rec.get("id"), rec.get("question"), rec.get("prediction"), *(rec.get("answers") or []))).lower()
    head = (
        f'<h2>{esc(rec.get("id"))} <span class="tag">{esc(bench)}</span>'
        f'<span class="tag">sample {esc(rec.get("sample"))}</span>'
        f'<span class="tag {oc}">{oc}</span><span class="tag">reward {esc(reward if reward is not None else "–")}</span>'
        f'<span class="tag">finish {esc(rec.get("finish"))}</span></h2>'
    )
    parts = [
        f'<article class="ep" data-benchmark="{esc(bench)}" data-outcome="{oc}" '
        f'data-reward="{esc(reward if reward is not None else "")}" data-search="{esc(search)}">',
        head,
        f'<div class="question">{esc(rec.get("question"))}</div>',
        '<div class="figs">' + "".join(_figure(links, str(p), boxes.get(i, [])) for i, p in enumerate(qimages)) + "</div>",
    ]
    n = 0
    started = False
    for m in messages:
        if m.get("role") == "system":
            continue
        if m is first and not started:
            started = True
            continue
        if m.get("role") == "assistant":
            n += 1
        parts.append(_turn_html(links, m, n))
    gold = ", ".join(rec.get("answers") or []) or "–"
    choices = rec.get("choices")
    rows = [("prediction", rec.get("prediction") if rec.get("prediction") is not None else "–"), ("gold", gold)]
    if choices:
        rows.append(("choices", "  ".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))))
    if isinstance(rec.get("rewards"), dict):
        rows.append(("rewards", json.dumps(rec["rewards"])))
    verdict = (rec.get("judge") or {}).get("verdict") if isinstance(rec.get("judge"), dict) else None
    if verdict is not None:
        rows.append(("judge", verdict))
    parts.append('<dl class="result">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows) + "</dl>")
    parts.append("</article>")
    return "".join(parts)


_SHOWN = ("messages", "tool_calls", "prediction", "finish", "tokens", "policy", "rewards", "reward", "judge")


def build_page(items: Iterable[tuple[object, dict]], out: str | os.PathLike, *, embed: bool = False,
               title: str = "mars episodes", limit: int | None = None, base: str | os.PathLike | None = None) -> dict:
    """Write the page for (where, trajectory) pairs to `out` atomically; returns a summary."""
    from mars_cli.eval.show_assets import CSS, JS
    from mars_cli.fsutil import atomic_file
    from mars_cli.records import validate

    out = Path(out)
    if not out.parent.exists():
        raise MarsError(f"{out}: directory {out.parent} does not exist")
    links = ImageLinks(out.parent, embed=embed, base=Path(base).resolve() if base is not None else None)
    benches: dict[str, int] = {}
    count = 0
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        body = []
        for where, rec in items:
            if limit is not None and count >= limit:
                break
            validate(rec, "task", where)
            # Every field the page reads, when present (a task alone is a valid input).
            validate(rec, "judged", where, only=tuple(k for k in _SHOWN if k in rec))
            body.append(episode_html(rec, links))
            b = str(rec.get("benchmark") or "unknown")
            benches[b] = benches.get(b, 0) + 1
            count += 1
        options = "".join(f'<option value="{esc(b)}">{esc(b)} ({n})</option>' for b, n in sorted(benches.items()))
        f.write(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src * data:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f'<header class="bar"><h1>{esc(title)}</h1>'
            f'<label>benchmark <select id="f-bench"><option value="">all</option>{options}</select></label>'
            '<label>outcome <select id="f-outcome"><option value="">all</option><option value="correct">correct</option>'
            '<option value="wrong">wrong</option><option value="rewarded">reward &gt; 0</option>'
            '<option value="missing">not judged</option></select></label>'
            '<input id="f-text" type="search" placeholder="filter id, question, answer">'
            f'<span id="count">{count} episodes</span></header><main>'
        )
        for chunk in body:
            f.write(chunk)
            f.write("\n")
        f.write(f"</main><script>{JS}</script></body></html>\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # the temporary file was private; a page is for reading
    return {"out": str(out), "episodes": count, "benchmarks": benches, "embed": embed}
