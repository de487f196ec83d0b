"""The summary table at the top of a `mars show` page: per benchmark, what a person
checks first — accuracy, format, tools per episode, turns and how episodes ended."""

from __future__ import annotations

import html

from mars_cli.eval.metrics import Subset, episode


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "–" if v is None else f"{v:.2f}"


class Summary:
    """Collects episodes per benchmark as the page is built; `html()` renders the table."""

    def __init__(self) -> None:
        self.subsets: dict[str, Subset] = {}

    def add(self, rec: dict) -> None:
        bench = str(rec.get("benchmark") or "unknown")
        self.subsets.setdefault(bench, Subset()).episodes.append(episode(rec))

    def rows(self) -> list[dict]:
        out = []
        names = sorted(self.subsets)
        if len(names) > 1:
            every = Subset([e for n in names for e in self.subsets[n].episodes])
            items = [(n, self.subsets[n]) for n in names] + [("all", every)]
        else:
            items = [(n, self.subsets[n]) for n in names]
        for name, sub in items:
            s = sub.summary()
            out.append({"benchmark": name, **s})
        return out

    def html(self) -> str:
        rows = self.rows()
        if not rows:
            return ""
        head = ("<tr><th>benchmark</th><th>episodes</th><th>tasks</th><th>accuracy</th><th>judged</th><th>format</th>"
                "<th>tools / episode</th><th>turns</th><th>finish</th></tr>")
        body = []
        for r in rows:
            tools = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in r["tool_calls_by_tool"].items())
            finish = ", ".join(f'<span class="fin-error">error {v}</span>' if k == "error" else f"{html.escape(k)} {v}"
                               for k, v in r["finish"].items())
            body.append(
                f'<tr><td>{html.escape(r["benchmark"])}</td><td>{r["episodes"]}</td><td>{r["tasks"]}</td>'
                f'<td class="acc">{_pct(r["pass@1"])}</td><td>{r["judged"]}</td><td>{_pct(r["format"])}</td>'
                f'<td>{_num(r["tool_calls"])}{f" ({tools})" if tools else ""}</td><td>{_num(r["turns"])}</td>'
                f"<td>{finish}</td></tr>")
        return f'<section class="summary"><table>{head}{"".join(body)}</table></section>'
