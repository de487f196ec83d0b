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


# --names words: every name is made of words from these short lists (distinct from each other,
# so a name word never reads as a city or a founder). A policy copies a word it has seen many
# times far sooner than an invented one, which a small model must copy character by character.
_NAME_WORDS = ("Amber", "Aspen", "Badger", "Beacon", "Birch", "Bramble", "Breeze", "Brook", "Cedar", "Clover",
               "Comet", "Copper", "Coral", "Crane", "Crystal", "Cypress", "Daisy", "Dawn", "Ember", "Falcon",
               "Fern", "Finch", "Flint", "Forest", "Garnet", "Granite", "Harbor", "Hawk", "Hazel", "Heather",
               "Heron", "Holly", "Ivy", "Jasper", "Juniper", "Lantern", "Lark", "Laurel", "Lilac", "Linden",
               "Lotus", "Maple", "Marble", "Meadow", "Mist", "Moss", "Oak", "Onyx", "Orchid", "Otter",
               "Pebble", "Pine", "Poppy", "Quartz", "Raven", "Reed", "Ridge", "Robin", "Rowan", "Saffron",
               "Sage", "Silver", "Slate", "Sparrow", "Spruce", "Summit", "Swan", "Thistle", "Thorn", "Thunder",
               "Tulip", "Velvet", "Violet", "Walnut", "Willow", "Wren")
_CITY_WORDS = ("Aldmere", "Ashford", "Bellport", "Brightwater", "Carlow", "Dunmore", "Eastvale", "Fairhaven",
               "Glenmoor", "Greystone", "Hollowell", "Kingsbridge", "Lakeside", "Millbrook", "Northgate", "Oakhurst",
               "Pinecrest", "Redcliff", "Rivermouth", "Southmere", "Stonehaven", "Westbury", "Whitby", "Woodhall")
_FIRST_NAMES = ("Ada", "Anna", "Clara", "David", "Edith", "Elias", "Felix", "Greta", "Hugo", "Ida", "Jonas", "Lena",
                "Marta", "Nils", "Oskar", "Paul", "Rosa", "Sven", "Tomas", "Vera")
_SURNAMES = ("Abbott", "Barlow", "Carver", "Dalton", "Ellery", "Fenwick", "Garrick", "Hartley", "Irving", "Kendall",
             "Lowell", "Mercer", "Norris", "Prescott", "Quincy", "Radley", "Sutton", "Thorne", "Whitlock", "Yardley")
_WORD_PLACES = _PLACE_WORDS + ("Court", "Wharf", "Square", "Lane", "Terrace", "Market", "Close", "Rise", "Parade", "Arcade",
                               "Garden", "Harbour", "Quarter", "Walk", "Fold", "Cross", "Mews", "End", "Heights", "Yards")
NAMES = ("made-up", "words")


class _Namer:
    """Draws the names of a benchmark: invented words (made-up) or words from short lists (words)."""

    def __init__(self, style: str = "made-up"):
        if style not in NAMES:
            raise MarsError(f"--names must be one of {', '.join(NAMES)}, got {style!r}")
        self.words = style == "words"

    @property
    def capacity(self) -> int | None:
        """How many distinct place names there are (None: unbounded)."""
        return len(_NAME_WORDS) * len(_WORD_PLACES) if self.words else None

    def first(self, rng: np.random.Generator) -> str:
        return str(rng.choice(_NAME_WORDS)) if self.words else _word(rng, int(rng.integers(2, 4)))

    def place(self, rng: np.random.Generator) -> str:
        return f"{self.first(rng)} {rng.choice(_WORD_PLACES if self.words else _PLACE_WORDS)}"

    def namesake(self, rng: np.random.Generator, name: str) -> str:
        """Another place with the same place word."""
        first = str(rng.choice(_NAME_WORDS)) if self.words else _word(rng, 2)
        return f"{first} {name.split()[-1]}"

    def entity(self, rng: np.random.Generator, name: str) -> dict:
        kind, year = str(rng.choice(KINDS)), str(int(rng.integers(1650, 1990)))
        if self.words:
            founder = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_SURNAMES)}"
            city = str(rng.choice(_CITY_WORDS))
        else:
            founder = f"{_word(rng, 2)} {_word(rng, int(rng.integers(2, 4)))}"
            city = _word(rng, int(rng.integers(2, 4)))
        return {"name": name, "kind": kind, "year": year, "founder": founder, "city": city}


_MADE_UP = _Namer()


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


def parse_attributes(spec: str | None) -> tuple[str, ...]:
    """The facts questions ask for, from `year,founder,city` (None: all three, in that order)."""
    if spec is None:
        return ATTRIBUTES
    names = tuple(dict.fromkeys(p.strip() for p in spec.split(",") if p.strip()))
    unknown = [a for a in names if a not in ATTRIBUTES]
    if unknown or not names:
        raise MarsError(f"--attributes: {', '.join(map(repr, unknown)) or 'nothing given'} "
                        f"(known: {', '.join(ATTRIBUTES)})")
    return tuple(a for a in ATTRIBUTES if a in names)


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


def plan_task(seed: int, i: int, taken: set[str], kinds: tuple[str, ...] = TASK_TYPES,
              namer: _Namer = _MADE_UP, attributes: tuple[str, ...] = ATTRIBUTES) -> dict:
    """Everything about task i except pixels: entity, near-miss distractors, question."""
    rng = np.random.default_rng([seed, i])
    name = namer.place(rng)
    while name in taken:
        name = namer.place(rng)
    taken.add(name)
    ent = namer.entity(rng, name)
    # A near namesake (same place word, other facts) makes the search need the exact name.
    near = namer.entity(rng, namer.namesake(rng, name))
    decoys = [namer.place(rng) for _ in range(int(rng.integers(8, 16)))]
    ttype = kinds[i % len(kinds)]
    attr = attributes[int(rng.integers(0, len(attributes)))]
    plan = {"index": i, "id": f"synth-{seed}-{i:05d}", "type": ttype, "entity": ent, "near": near,
            "decoys": decoys, "attribute": attr, "scene_seed": [seed, i, 1]}
    if ttype == "perception":
        options = [name]
        while len(options) < 4:
            option = namer.place(rng)
            if option not in options:
                options.append(option)
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
               kinds: str | None = None, protocol: str | None = None, val_fraction: float = 0.0,
               names: str = "made-up", system_prompt: str | None = None, search_k: int | None = None,
               attributes: str | None = None, vague_fraction: float = 0.0) -> dict:
    """Generate the benchmark into `out_dir` (replaced atomically); returns a summary.

    `val_fraction` of the tasks also go to DIR/val/ (for choosing training settings
    without touching test/). `kinds` weights the task kinds (parse_kinds); `protocol` is the profile the reference
    trajectories are written in (its system prompt; default: the default profile), and
    `system_prompt` replaces that prompt's text as `mars rollout --system-prompt` does. `names`
    is made-up (invented words) or words (names, cities and founders from short word lists).
    With `search_k` the reference searches are run on a local index of the corpus, as `mars
    index text` builds and `mars rollout --search-k` reads, so a reference shows exactly what the
    tool returns; without it a reference shows the gold passage, then its namesake.
    `attributes` (comma-separated: year, founder, city) are the facts questions ask for.
    `vague_fraction` of the references (with `search_k`) search for the place's kind and
    place word instead of its name, and answer from whatever place that finds: a teacher
    that follows the protocol but writes vague queries.
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
    namer = _Namer(names)
    asked = parse_attributes(attributes)
    if not 0.0 <= vague_fraction <= 1.0:
        raise MarsError(f"--vague-fraction must be in [0, 1], got {vague_fraction}")
    if vague_fraction and not search_k:
        raise MarsError("--vague-fraction needs --search-k: a vague query's results come from the index")
    if search_k is not None and search_k < 1:
        raise MarsError(f"--search-k must be at least 1, got {search_k}")
    if namer.capacity is not None and n > namer.capacity * 3 // 4:
        raise MarsError(f"--names {names} makes {namer.capacity} distinct place names, enough for at most "
                        f"{namer.capacity * 3 // 4} tasks (each needs its own and a namesake); got --tasks {n}")
    out_dir = Path(os.path.abspath(out_dir))  # absolute paths in records: they run from any directory
    taken: set[str] = set()
    plans = [plan_task(seed, i, taken, rotation, namer, asked) for i in range(n)]
    for p in plans:  # one draw per task, apart from the plan's: the tasks are the same at any fraction
        p["vague"] = p["type"] != "perception" and np.random.default_rng([seed, p["index"], 4]).random() < vague_fraction
    for p in plans:  # a namesake never shares a name a task asks about (a later task may have drawn it)
        rng = np.random.default_rng([seed, p["index"], 2])
        tries = 0
        while p["near"]["name"] in taken:  # every name of that place word may be asked: then any free one
            tries += 1
            p["near"]["name"] = namer.namesake(rng, p["entity"]["name"]) if tries < 200 else namer.place(rng)
    rng = np.random.default_rng([seed, 1 << 20])
    extra = [namer.entity(rng, namer.place(rng)) for _ in range(distractors * n)]
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

        searched = _indexed_searches(plans, corpus, search_k) if search_k else {}
        facts = {f"{p['id']}-{key}": p[key] for p in plans for key in ("entity", "near")}
        facts.update({f"synth-{seed}-extra-{j:05d}": e for j, e in enumerate(extra)})
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
            results = searched.get(p["id"]) if search_k else search_results(p, corpus)
            if p["vague"] and results:  # the answer is whatever the place the search found says
                p["found"] = facts[results[0]["doc_id"]]
            refs.append(reference_trajectory(task, p, results or [], tmp, out_dir, box_grid=box_grid,
                                            profile=profile, system_prompt=system_prompt))

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


def _indexed_searches(plans: list[dict], corpus: list[dict], k: int) -> dict[str, list[dict]]:
    """Each search task's reference search, run on a local index of `corpus` (top `k`)."""
    import tempfile

    from mars_cli.tools.index_text import build_text_index
    from mars_cli.tools.text_search import LocalBackend

    with tempfile.TemporaryDirectory(prefix="mars-synth-index-") as tmp:
        build_text_index(iter(corpus), Path(tmp) / "index", total=len(corpus), progress=False)
        backend = LocalBackend(str(Path(tmp) / "index"), {})
        return {p["id"]: backend.search(reference_query(p), k) for p in plans if p["type"] != "perception"}


def reference_query(plan: dict) -> str:
    """What the reference agent searches for: the exact name, or (vague) the kind and place word."""
    ent = plan["entity"]
    return f"{ent['kind']} {ent['name'].split()[-1]}" if plan.get("vague") else ent["name"]


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
                         box_grid: int = BOX_GRID, profile: str | None = None, system_prompt: str | None = None) -> dict:
    """The episode a perfect agent has on this task, in the protocol's exact format."""
    from mars_cli import protocol as P
    from mars_cli.eval.render_synth import CANVAS
    from mars_cli.tools.crop import crop_image
    from mars_cli.tools.text_search import render_text_results

    ent = plan["entity"]
    messages = P.initial_messages(task, profile=profile or P.DEFAULT_PROFILE, system_prompt=system_prompt)
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
    answer, meta = plan["answer"], task["meta"]
    if plan["type"] == "perception":
        act(f'The sign reads "{ent["name"]}": option {answer}.', answer=answer)
    else:
        lead = (f'The sign reads "{ent["name"]}".' if plan["type"] == "crop+search"
                else f'The question is about {ent["name"]}.')
        fact = FACTS[plan["attribute"]].format(**ent)
        query = reference_query(plan)
        how = "by what it is" if plan.get("vague") else "by its exact name"
        act(f"{lead} I will search for this {ent['kind']} {how}.",
            call=(P.TEXT_SEARCH, {"query": query}),
            result=P.tool_message(P.TEXT_SEARCH, render_text_results(query, results)))
        found = plan.get("found")
        if found is not None:  # a vague search: read the first result, right place or not
            answer, meta = found[plan["attribute"]], {**meta, "reference": "vague"}
            fact = FACTS[plan["attribute"]].format(**found)
            act(f"The {'first ' if len(results) > 1 else ''}result is about {found['name']}: {fact}.", answer=answer)
        elif len(results) > 1:
            act(f"The first result is about {ent['name']} itself, not its namesake: {fact}.", answer=answer)
        else:
            act(f"The result is about {ent['name']}: {fact}.", answer=answer)
    return {**task, "meta": meta, "group": task["id"], "sample": 0, "messages": messages, "tool_calls": calls,
            "prediction": answer, "finish": "answer", "tokens": None, "policy": {"engine": "reference"}}


def _write(path: Path, records: list[dict]) -> None:
    from mars_cli.jsonl import RecordWriter

    with RecordWriter(path) as w:
        for r in records:
            w.write(r)
