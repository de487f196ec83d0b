"""Run setup shared by `mars rollout` and `mars ask`: engine, tools, resume, output, --check.

Where artifacts go, which search tools are configured, which (task, sample) pairs
`--resume` skips, and how records reach stdout or `-o FILE` (atomically: a temporary file
renamed when the run ends; on Ctrl-C the episodes already finished are kept, so `--resume`
can continue).
"""

from __future__ import annotations

import os
from pathlib import Path

from mars_cli import streams


def artifacts_dir(flag: str | None, out: str | None) -> Path:
    """--artifacts, else MARS_ARTIFACTS, else `artifacts/` beside -o FILE, else ./artifacts."""
    if flag:
        return Path(flag)
    env = os.environ.get("MARS_ARTIFACTS")
    if env:
        return Path(env)
    if out and out != "-":
        return Path(out).resolve().parent / "artifacts"
    return Path("artifacts")


def open_toolbox(artifacts: str | os.PathLike, *, search_backend: str | None = None, index: str | None = None,
                 image_search_backend: str | None = None, image_index: str | None = None, cache: str | None = None,
                 replay: bool = False, summarize: bool = False, k: int = 5, search_opts: dict | None = None,
                 text_search=None, image_search=None):
    """A Toolbox with the configured search tools.

    A `local` backend without an index leaves that tool off (the model is told it is not
    available when it calls it) rather than failing the run: crop-only benchmarks need none.
    """
    from mars_cli.agent.toolbox import Toolbox
    from mars_cli.tools.cache import open_cache

    tool_cache = open_cache(cache, replay=replay)
    search_opts = {k_: v for k_, v in (search_opts or {}).items() if v is not None}
    if text_search is None:
        backend = search_backend or os.environ.get("MARS_SEARCH_BACKEND") or "local"
        if backend == "local" and not (index or os.environ.get("MARS_INDEX")):
            streams.warn("text search is off: no --index (or MARS_INDEX) for the local backend")
        else:
            from mars_cli.tools.text_search import open_text_search

            text_search = open_text_search(backend, index=index, cache=tool_cache, replay=replay, summarize=summarize,
                                           **search_opts)
    if image_search is None:
        backend = image_search_backend or os.environ.get("MARS_IMAGE_SEARCH_BACKEND") or "local"
        if backend == "local" and not (image_index or os.environ.get("MARS_IMAGE_INDEX")):
            streams.warn("image search is off: no --image-index (or MARS_IMAGE_INDEX) for the local backend")
        else:
            from mars_cli.tools.image_search import open_image_search

            image_search = open_image_search(backend, index=image_index, cache=tool_cache, replay=replay)
    return Toolbox(artifacts, text_search=text_search, image_search=image_search, k=k)


def completed(out: str | os.PathLike) -> tuple[list[dict], set[tuple]]:
    """For --resume: the records already in `out` and the (group, sample) pairs they finish."""
    from mars_cli.jsonl import read_located

    path = Path(out)
    if not path.exists():
        return [], set()
    old, done = [], set()
    for where, rec in read_located([path]):
        if "group" in rec and "sample" in rec and rec.get("finish"):
            old.append(rec)
            done.add((str(rec["group"]), rec["sample"]))
    return old, done


ENGINE_OPTS = {"hf": ("device", "dtype", "max_batch", "attn_implementation"), "vllm": ("tp", "gpu_memory_utilization", "dtype"),
               "openai": ("base_url", "model")}


def make_engine(name: str, policy: str | None, sampling: dict | None = None, **opts):
    """open_engine with the options that engine takes (the CLI passes all of them)."""
    from mars_cli.engines import Sampling, open_engine

    keep = {k: v for k, v in opts.items() if k in ENGINE_OPTS.get(name, ()) and v is not None}
    return open_engine(name, policy=policy, sampling=Sampling(**(sampling or {})), **keep)


def rollout(files, *, out: str | None, n: int, engine: dict, sampling: dict, limits: dict, tools: dict,
            batch_size: int = 64, artifacts: str | None = None, resume: bool = False, skip_bad: bool = False,
            system_prompt: str | None = None) -> dict:
    """`mars rollout`: read tasks, run episodes, write trajectories; return finish counts."""
    from mars_cli.agent.loop import AgentLoop, Limits
    from mars_cli.jsonl import RecordWriter, read_located
    from mars_cli.records import validate

    lim = Limits(**limits)
    old, done = completed(out) if resume else ([], set())
    toolbox = open_toolbox(artifacts_dir(artifacts, out), **tools)
    eng = make_engine(**engine, sampling=sampling)
    loop = AgentLoop(eng, toolbox, limits=lim, batch_size=batch_size, system_prompt=system_prompt)
    tasks = (validate(rec, "task", where) for where, rec in read_located(files, skip_bad=skip_bad))
    counts: dict[str, int] = {}
    writer = RecordWriter(out)
    bar = streams.progress(unit="episode", desc="rollout")
    ok = False
    try:
        for rec in old:
            writer.write(rec, fresh=())
        for rec in loop.run(tasks, n=n, skip=done):
            writer.write(rec, fresh=("tokens", "tool_calls", "elapsed"))
            counts[rec["finish"]] = counts.get(rec["finish"], 0) + 1
            bar.update(1)
            bar.set_postfix(counts, refresh=False)
        ok = True
    except KeyboardInterrupt:
        ok = out is not None  # keep the finished episodes of an interrupted run
        raise
    finally:
        bar.close()
        writer.close(ok=ok)
        eng.close()
    if streams.progress_enabled():
        streams.warn(f"{sum(counts.values())} episodes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return counts


def check_files(files, policy: str, *, out: str | None = None, skip_bad: bool = False) -> None:
    """`mars rollout --check`: each trajectory with a `check` field; MarsError if any fails."""
    from mars_cli.agent.check import check_trajectory
    from mars_cli.errors import MarsError
    from mars_cli.jsonl import RecordWriter, read_located
    from mars_cli.models.load import load_tokenizer, special_ids
    from mars_cli.protocol import Renderer
    from mars_cli.records import validate

    tok = load_tokenizer(policy)
    renderer = Renderer(tok, special_ids(tok, policy))
    total = bad = 0
    with RecordWriter(out) as writer:
        for where, rec in read_located(files, skip_bad=skip_bad):
            rec = validate(rec, "trajectory", where)
            problems = check_trajectory(rec, renderer)
            total += 1
            if problems:
                bad += 1
                for p in problems:
                    streams.warn(f"{where}: {rec['group']}/{rec['sample']}: {p}")
            rec["check"] = {"ok": not problems, "problems": problems}
            writer.write(rec, fresh=("check",))
    if bad:
        raise MarsError(f"{bad} of {total} trajectories failed the token check")
    if streams.progress_enabled():
        streams.warn(f"{total} trajectories: tokens consistent")


def ask(image: str, question: str, *, engine: dict, sampling: dict, limits: dict, tools: dict,
        artifacts: str | None = None, trace: bool = True) -> dict:
    """`mars ask`: one episode on one image, traced on stderr; returns the trajectory record."""
    from mars_cli.agent.loop import AgentLoop, Limits
    from mars_cli.agent.trace import Tracer
    from mars_cli.errors import MarsError
    from mars_cli.records import make_task

    if not image.startswith(("http://", "https://")) and not Path(image).is_file():
        raise MarsError(f"{image}: no such image file")
    toolbox = open_toolbox(artifacts_dir(artifacts, None), **tools)
    eng = make_engine(**engine, sampling=sampling)
    tracer = Tracer() if trace else None
    loop = AgentLoop(eng, toolbox, limits=Limits(**limits), batch_size=1, on_turn=tracer)
    try:
        [rec] = list(loop.run([make_task("ask", question, images=[image], benchmark="ask")]))
    finally:
        eng.close()
    if tracer is not None:
        tracer.summary(rec)
    return rec
