"""The offline synthetic benchmark: 4K scenes, a made-up knowledge base, reference answers.

`make_synth(out_dir, n=64, seed=0)` writes

    DIR/tasks.jsonl       task records (benchmark "synth", meta.type says which kind)
    DIR/corpus.jsonl      {"id", "title", "text"} passages for `mars index text`
    DIR/reference.jsonl   one reference trajectory per task (cold-start data for `mars sft`)
    DIR/images/           the 3840×2160 scenes (JPEG)
    DIR/artifacts/        the crops the reference trajectories show
    DIR/train/, DIR/test/ tasks.jsonl + reference.jsonl of each split (with test_fraction > 0),
    DIR/val/              and of a validation split (with val_fraction > 0)

Three kinds of task, in a fixed rotation by index (`kinds` weights them; the default
rotation is crop+search=3, perception=1, search=1):
- "crop+search": a scene with one small yellow sign naming a made-up place; the question
  asks a fact about it, so the agent must zoom to read the name, then search the corpus;
- "perception": which name is on the sign, four options (`scorer: mcq`);
- "search": the question names the place outright; only a text search is needed.

Everything about task i follows from (seed, i, kinds) alone, so `--tasks 128` extends `--tasks 64`.
The reference trajectories are written with the protocol's own functions and real crop
files, so they are exactly what the agent would produce and see.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from mars_cli import streams
from mars_cli.errors import MarsError

KINDS = ("lighthouse", "observatory", "brewery", "bridge", "museum", "ferry terminal", "library", "mill")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "x")
_PLACE_WORDS = ("Quay", "Point", "Hall", "Works", "Gate", "Crossing", "Yard", "Tower", "Row", "Landing")
TASK_TYPES = ("crop+search", "crop+search", "crop+search", "perception", "search")
ATTRIBUTES = ("year", "founder", "city")
BENCHMARK = "synth"
BOX_GRID = 50  # reference zoom boxes snap outward to multiples of this (0-1000 units)


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = [str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) + str(rng.choice(_CODAS)) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _place_name(rng: np.random.Generator) -> str:
    return f"{_word(rng, int(rng.integers(2, 4)))} {rng.choice(_PLACE_WORDS)}"


def _entity(rng: np.random.Generator, name: str) -> dict:
    return {
        "name": name,
        "kind": str(rng.choice(KINDS)),
        "year": str(int(rng.integers(1650, 1990))),
        "founder": f"{_word(rng, 2)} {_word(rng, int(rng.integers(2, 4)))}",
        "city": _word(rng, int(rng.integers(2, 4))),
    }


def passage(e: dict) -> str:
    return (
        f"{e['name']} is {'an' if e['kind'][0] in 'aeiou' else 'a'} {e['kind']} in the city of {e['city']}. It was founded in {e['year']} "
        f"by {e['founder']}, and it is known locally for its yellow signboard."
    )


QUESTIONS = {
    "year": ("In which year was the {kind} named on the yellow sign founded?", "In which year was {name}, a {kind}, founded?"),
    "founder": ("Who founded the {kind} named on the yellow sign?", "Who founded {name}, a {kind}?"),
    "city": ("In which city is the {kind} named on the yellow sign?", "In which city is {name}, a {kind}?"),
}


def parse_kinds(spec: str | None) -> tuple[str, ...]:
    """The rotation of task kinds from `KIND=WEIGHT,…` (a bare KIND weighs 1), in the order given.

    None gives the default rotation (TASK_TYPES). `search=3,crop+search=1` gives three
    search tasks, then one crop+search task, and again.
    """
    if spec is None:
        return TASK_TYPES
    known = tuple(dict.fromkeys(TASK_TYPES))
    rotation: list[str] = []
    seen = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in known:
            raise MarsError(f"--kinds: unknown kind {name!r} (known: {', '.join(known)})")
        if name in seen:
            raise MarsError(f"--kinds: {name} given twice")
        seen.add(name)
        try:
            w = int(weight) if weight.strip() else 1
        except ValueError:
            raise MarsError(f"--kinds: the weight of {name} must be a whole number, got {weight!r}") from None
        if not 0 <= w <= 1000:
            raise MarsError(f"--kinds: the weight of {name} must be in [0, 1000], got {w}")
        rotation += [name] * w
    if not rotation:
        raise MarsError(f"--kinds: no kind has a positive weight in {spec!r}")
    return tuple(rotation)


def plan_task(seed: int, i: int, taken: set[str], kinds: tuple[str, ...] = TASK_TYPES) -> dict:
    """Everything about task i except pixels: entity, near-miss distractors, question."""
    rng = np.random.default_rng([seed, i])
    name = _place_name(rng)
    while name in taken:
        name = _place_name(rng)
    taken.add(name)
    ent = _entity(rng, name)
    # A near namesake (same place word, other facts) makes the search need the exact name.
    near = _entity(rng, f"{_word(rng, 2)} {name.split()[-1]}")
    decoys = [_place_name(rng) for _ in range(int(rng.integers(8, 16)))]
    ttype = kinds[i % len(kinds)]
    attr = ATTRIBUTES[int(rng.integers(0, len(ATTRIBUTES)))]
    plan = {"index": i, "id": f"synth-{seed}-{i:05d}", "type": ttype, "entity": ent, "near": near,
            "decoys": decoys, "attribute": attr, "scene_seed": [seed, i, 1]}
    if ttype == "perception":
        options = [name] + [_place_name(rng) for _ in range(3)]
        order = rng.permutation(len(options))
        plan["choices"] = [options[j] for j in order]
        plan["answer"] = "ABCD"[int(np.flatnonzero(order == 0)[0])]
        plan["question"] = "What name is written on the yellow sign?"
    else:
        q_crop, q_text = QUESTIONS[attr]
        plan["question"] = (q_crop if ttype == "crop+search" else q_text).format(**ent)
        plan["answer"] = ent[attr]
    return plan


def render_plan(args: tuple[dict, str]) -> tuple[list[int], int]:
    """Draw task's scene to `path`; returns the plate's pixel box and the file size."""
    from mars_cli.eval.render_synth import draw_scene, encode_jpeg

    plan, path = args
    rng = np.random.default_rng(plan["scene_seed"])
    img, box = draw_scene(rng, plan["entity"]["name"], plan["decoys"])
    data = encode_jpeg(img)
    with open(path, "wb") as f:
        f.write(data)
    return list(box), len(data)


def _split_of(plan: dict, seed: int, test_fraction: float, val_fraction: float = 0.0) -> str:
    """test, val or train: one uniform draw per task, so the test split never depends on val_fraction."""
    if test_fraction <= 0 and val_fraction <= 0:
        return "train"
    u = np.random.default_rng([seed, plan["index"], 7]).random()
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _counted(bar, items):
    """`items`, ticking the progress bar as each one arrives."""
    for x in items:
        bar.update(1)
        yield x


def make_synth(out_dir: str | os.PathLike, *, n: int = 64, seed: int = 0, test_fraction: float = 0.0,
               distractors: int = 2, box_grid: int = BOX_GRID, workers: int | None = None,
               kinds: str | None = None, protocol: str | None = None, val_fraction: float = 0.0) -> dict:
    """Generate the benchmark into `out_dir` (replaced atomically); returns a summary.

    `val_fraction` of the tasks also go to DIR/val/ (for choosing training settings
    without touching test/). `kinds` weights the task kinds (parse_kinds); `protocol` is the profile the reference
    trajectories are written in (its system prompt; default: the default profile).
    """
    from mars_cli.protocol import get_profile

    from mars_cli.fsutil import atomic_dir
    from mars_cli.records import make_task

    if n < 1:
        raise MarsError(f"--n must be at least 1, got {n}")
    if not 0.0 <= test_fraction < 1.0:
        raise MarsError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0 or test_fraction + val_fraction >= 1.0:
        raise MarsError(f"--val-fraction must be in [0, 1) and leave training tasks beside --test-fraction, got {val_fraction}")
    if not 1 <= box_grid <= 1000:
        raise MarsError(f"--box-grid must be in [1, 1000] (units of the 0-1000 box scale), got {box_grid}")
    rotation = parse_kinds(kinds)
    profile = get_profile(protocol).name
    out_dir = Path(os.path.abspath(out_dir))  # absolute paths in records: they run from any directory
    taken: set[str] = set()
    plans = [plan_task(seed, i, taken, rotation) for i in range(n)]
    rng = np.random.default_rng([seed, 1 << 20])
    extra = [_entity(rng, _place_name(rng)) for _ in range(distractors * n)]
    extra = [e for e in extra if e["name"] not in taken]

    with atomic_dir(out_dir) as tmp:
        for sub in ("images", "artifacts"):
            (tmp / sub).mkdir()
        drawn = [p for p in plans if p["type"] != "search"]
        jobs = [(p, str(tmp / "images" / f"{p['id']}.jpg")) for p in drawn]
        workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1)
        bar = streams.progress(total=len(jobs), desc="rendering", unit="scenes", summary=False)
        if workers > 1 and len(jobs) > 4:
            with ProcessPoolExecutor(workers) as pool:
                boxes = list(_counted(bar, pool.map(render_plan, jobs, chunksize=4)))
        else:
            boxes = list(_counted(bar, map(render_plan, jobs)))
        bar.close()
        for p, (box, _) in zip(drawn, boxes):
            p["box"] = box

        corpus = []
        for p in plans:
            for key in ("entity", "near"):
                e = p[key]
                corpus.append({"id": f"{p['id']}-{key}", "title": e["name"], "text": passage(e)})
        corpus += [{"id": f"synth-{seed}-extra-{j:05d}", "title": e["name"], "text": passage(e)} for j, e in enumerate(extra)]

        tasks, refs = [], []
        for p in plans:
            images = [str(out_dir / "images" / f"{p['id']}.jpg")] if p["type"] != "search" else []
            meta = {"type": p["type"], "split": _split_of(p, seed, test_fraction, val_fraction), "seed": seed}
            if p["type"] != "perception":
                meta["attribute"] = p["attribute"]
            if "box" in p:
                meta["target_box_px"] = p["box"]
                meta["target_label"] = p["entity"]["name"]
            task = make_task(p["id"], p["question"], images=images, answers=[p["answer"]],
                             choices=p.get("choices"), benchmark=BENCHMARK,
                             scorer="mcq" if p["type"] == "perception" else "em", meta=meta)
            tasks.append(task)
            refs.append(reference_trajectory(task, p, search_results(p, corpus), tmp, out_dir, box_grid=box_grid,
                                            profile=profile))

        _write(tmp / "tasks.jsonl", tasks)
        _write(tmp / "reference.jsonl", refs)
        _write(tmp / "corpus.jsonl", corpus)
        if test_fraction > 0 or val_fraction > 0:
            for split in ["train"] + ["val"] * (val_fraction > 0) + ["test"] * (test_fraction > 0):
                (tmp / split).mkdir()
                _write(tmp / split / "tasks.jsonl", [t for t in tasks if t["meta"]["split"] == split])
                _write(tmp / split / "reference.jsonl", [r for r in refs if r["meta"]["split"] == split])
    counts = {t: sum(1 for p in plans if p["type"] == t) for t in dict.fromkeys(rotation)}
    return {"out": str(out_dir), "tasks": n, "passages": len(corpus), "images": len(drawn), "types": counts,
            "test": sum(1 for t in tasks if t["meta"]["split"] == "test"),
            "val": sum(1 for t in tasks if t["meta"]["split"] == "val")}


# --- reference trajectories ------------------------------------------------------------

FACTS = {
    "year": "{name} was founded in {year}",
    "founder": "{name} was founded by {founder}",
    "city": "{name} is in the city of {city}",
}


def search_results(plan: dict, corpus: list[dict]) -> list[dict]:
    """What a search for the name returns in the reference: the gold passage, then the namesake."""
    if plan["type"] == "perception":
        return []
    by_id = {c["id"]: c for c in corpus}
    out = []
    for rank, key in enumerate(("entity", "near"), 1):
        c = by_id[f"{plan['id']}-{key}"]
        out.append({"rank": rank, "title": c["title"], "text": c["text"], "doc_id": c["id"], "score": None, "backend": "reference"})
    return out


def padded_bbox(box_px: list[int], size: tuple[int, int], pad: float = 0.3, grid: int = BOX_GRID) -> list[int]:
    """The plate's box grown by `pad` of its size (at least 24 px) in 0–1000 units.

    The edges are then moved outward to multiples of `grid` (the crop still covers the
    plate): a reference agent gives coarse boxes, as a person would, and a small policy
    learning from them copies far fewer arbitrary digits.
    """
    w, h = size
    l, t, r, b = box_px
    dx, dy = max(24, (r - l) * pad), max(24, (b - t) * pad)
    l, t, r, b = max(0, l - dx), max(0, t - dy), min(w, r + dx), min(h, b + dy)
    box = [int(l * 1000 // w), int(t * 1000 // h), -int(-r * 1000 // w), -int(-b * 1000 // h)]
    if grid > 1:
        box = [box[0] // grid * grid, box[1] // grid * grid, -(-box[2] // grid) * grid, -(-box[3] // grid) * grid]
    return [max(0, min(1000, v)) for v in box]


def reference_trajectory(task: dict, plan: dict, results: list[dict], tmp: Path, final: Path, *,
                         box_grid: int = BOX_GRID, profile: str | None = None) -> dict:
    """The episode a perfect agent has on this task, in the protocol's exact format."""
    from mars_cli import protocol as P
    from mars_cli.eval.render_synth import CANVAS
    from mars_cli.tools.crop import crop_image
    from mars_cli.tools.text_search import render_text_results

    ent = plan["entity"]
    messages = P.initial_messages(task, profile=profile or P.DEFAULT_PROFILE)
    calls: list[dict] = []

    def act(thinking: str, *, call=None, answer=None, result=None):
        messages.append({"role": "assistant", "content": P.format_assistant(thinking, call=call, answer=answer)})
        if call is not None:
            # Turns count from 1, as the agent loop numbers them.
            turn = sum(1 for m in messages if m["role"] == "assistant")
            calls.append({"turn": turn, "name": call[0], "arguments": call[1], "ok": True, "error": None, "latency": 0.0})
            messages.append(result)

    if plan["type"] != "search":
        bbox = padded_bbox(plan["box"], CANVAS, grid=box_grid)
        crop = crop_image(tmp / "images" / f"{plan['id']}.jpg", P.bbox_to_unit(bbox), out_dir=tmp / "artifacts", clamp=True)
        shown = str(final / "artifacts" / Path(crop["path"]).name)
        # Short, regular thinking: one reason per action. The box is in the call itself;
        # repeating its numbers, or padding the prose, only adds tokens a small model copies.
        act("The yellow sign is too small to read at this scale, so I will zoom in on it.",
            call=(P.ZOOM, {"bbox_2d": bbox, "label": "yellow sign"}),
            result=P.tool_message(P.ZOOM, P.ZOOM_HEADER, [shown]))
    if plan["type"] == "perception":
        act(f'The sign reads "{ent["name"]}": option {plan["answer"]}.', answer=plan["answer"])
    else:
        lead = (f'The sign reads "{ent["name"]}".' if plan["type"] == "crop+search"
                else f'The question is about {ent["name"]}.')
        act(f"{lead} I will search for this {ent['kind']} by its exact name.",
            call=(P.TEXT_SEARCH, {"query": ent["name"]}),
            result=P.tool_message(P.TEXT_SEARCH, render_text_results(ent["name"], results)))
        fact = FACTS[plan["attribute"]].format(**ent)
        act(f"The first result is about {ent['name']} itself, not its namesake: {fact}.", answer=plan["answer"])
    return {**task, "group": task["id"], "sample": 0, "messages": messages, "tool_calls": calls,
            "prediction": plan["answer"], "finish": "answer", "tokens": None, "policy": {"engine": "reference"}}


def _write(path: Path, records: list[dict]) -> None:
    from mars_cli.jsonl import RecordWriter

    with RecordWriter(path) as w:
        for r in records:
            w.write(r)
