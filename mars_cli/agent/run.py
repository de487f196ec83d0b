"""Run setup shared by `mars rollout` and `mars ask`: engine, tools, resume, output, --check.

Where artifacts go, which search tools are configured, which engine runs the policy, how
records reach stdout or `-o FILE` (agent/output.py: appended per finished episode, so
`--resume` continues after any interruption), and the summary line every rollout ends with.
Exit status: 1 for a bad input line (after the episodes already started are written), a
lost engine (no server left), or more `error` episodes than `--max-error-rate` allows.
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
                 text_search=None, image_search=None, profile: str | None = None, engine=None):
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
            streams.warn("text search is off: no --index (or MARS_INDEX) for the local backend, so every search "
                         "the model makes answers 'not available' (build one: mars index text CORPUS --out DIR)")
        else:
            from mars_cli.tools.text_search import open_text_search

            text_search = open_text_search(backend, index=index, cache=tool_cache, replay=replay, summarize=summarize,
                                           **search_opts)
    if image_search is None:
        backend = image_search_backend or os.environ.get("MARS_IMAGE_SEARCH_BACKEND") or "local"
        if backend == "local" and not (image_index or os.environ.get("MARS_IMAGE_INDEX")):
            pass  # said at the first task with images (note_image_search_off): text-only tasks never miss it
        else:
            from mars_cli.tools.image_search import open_image_search

            image_search = open_image_search(backend, index=image_index, cache=tool_cache, replay=replay)
    kwargs: dict = {"profile": profile} if profile is not None else {}  # tool result strings per profile
    # The official crop rule works on the image as the model sees it: the engine's limits.
    pixels = (engine.pixels if engine is not None else None) or {}
    for key, value in (("min_pixels", pixels.get("min")), ("max_pixels", pixels.get("max")),
                       ("factor", engine.image_factor if engine is not None else None)):
        if value is not None:
            kwargs[key] = value
    return Toolbox(artifacts, text_search=text_search, image_search=image_search, k=k, **kwargs)


IMAGE_SEARCH_OFF = "image search is off: no --image-index (or MARS_IMAGE_INDEX) for the local backend"


class ImageSearchNote:
    """`note(located)` passes (where, task) pairs through and says once per run, at the first
    task with images, that image search is off (not under -q: a note, not a warning)."""

    def __init__(self, toolbox):
        self.said = toolbox.image_search is not None

    def __call__(self, located):
        for where, rec in located:
            if not self.said and rec.get("images"):
                self.said = True
                if not streams.quiet:
                    streams.warn(IMAGE_SEARCH_OFF)
            yield where, rec


ENGINE_OPTS = {"hf": ("device", "dtype", "max_batch", "attn_implementation", "min_pixels", "max_pixels"),
               "vllm": ("tp", "gpu_memory_utilization", "dtype", "min_pixels", "max_pixels"),
               "openai": ("base_url", "model", "timeout", "max_retries", "image_view"),
               "server": ("urls", "api_key", "timeout", "min_pixels", "max_pixels")}


def apply_profile(protocol: str | None, engine: dict) -> dict:
    """Engine options with the profile's image settings where no flag gave them.

    Sets the process's image decode mode (protocol.Profile.decode), so crops, engines and
    the judge read images alike; the caller restores it (images.decode_mode() before). A profile with `pixels` (sensenova-eval) fills in
    --min-pixels/--max-pixels; with `send_images="view"` a chat engine sends each image
    resized to them (the factor is the profile's) instead of the file as stored. Where a
    reply ends is the same under every profile: engines.stop_ids.
    """
    from mars_cli import images
    from mars_cli import protocol as proto

    prof = proto.get_profile(protocol)
    images.set_decode_mode(prof.decode)
    engine = dict(engine)
    if prof.pixels is not None:
        lo, hi, factor = prof.pixels
        engine["min_pixels"] = engine.get("min_pixels") or lo
        engine["max_pixels"] = engine.get("max_pixels") or hi
        if prof.send_images == "view":
            engine["image_view"] = (engine["min_pixels"], engine["max_pixels"], factor)
    return engine


def make_engine(name: str, policy: str | None, sampling: dict | None = None, **opts):
    """open_engine with the options that engine takes (the CLI passes all of them)."""
    from mars_cli.engines import Sampling, open_engine

    if name == "server" and opts.get("api_key") is None:
        opts["api_key"] = os.environ.get("MARS_SERVE_API_KEY") or None
    keep = {k: v for k, v in opts.items() if k in ENGINE_OPTS.get(name, ()) and v is not None}
    return open_engine(name, policy=policy, sampling=Sampling(**(sampling or {})), **keep)


def _task_total(files, n: int, done: int) -> int | None:
    """Episodes this run will start, when the input is regular files (a cheap line count)."""
    paths = [str(f) for f in files or []]
    if not paths or any(p == "-" or not Path(p).is_file() for p in paths):
        return None
    lines = 0
    for p in paths:
        with open(p, "rb") as f:
            lines += sum(1 for line in f if line.strip())
    return max(0, lines * n - done)


def rollout(files, *, out: str | None, n: int, engine: dict, sampling: dict, limits: dict, tools: dict,
            max_inflight: int = 64, artifacts: str | None = None, resume: bool = False, skip_bad: bool = False,
            system_prompt: str | None = None, group_order: bool = False, max_error_rate: float = 0.5,
            loop: bool = False, seed: int | None = None, batch_groups: int | None = None, max_staleness: int = 1,
            protocol: str | None = None, on_malformed: str | None = None, workflow: str = "agent") -> dict:
    """`mars rollout`: read tasks, run episodes, write trajectories; return finish counts."""
    import time

    from mars_cli.agent import feed
    from mars_cli.agent.loop import AgentLoop, Limits
    from mars_cli.agent.output import EpisodeOutput
    from mars_cli.jsonl import read_located
    from mars_cli.paths import resolve_task_images
    from mars_cli.records import validate, warn_duplicate_tasks

    from mars_cli import images

    lim = Limits(**limits)
    decode = images.decode_mode()
    engine = apply_profile(protocol, engine)
    EpisodeOutput.check(out)  # before the model loads; the file itself is opened once it has
    writer = None
    counts: dict[str, int] = {}
    errors: list[str] = []
    t0 = time.perf_counter()
    eng = None
    bar = None  # set once episodes can start: a run that fails before says only why
    try:
        eng = make_engine(**engine, sampling=sampling)
        toolbox = open_toolbox(artifacts_dir(artifacts, out), **tools, profile=protocol, engine=eng)
        agent = AgentLoop(eng, toolbox, limits=lim, max_inflight=max_inflight, system_prompt=system_prompt,
                          profile=protocol, on_malformed=on_malformed, workflow=workflow)
        gate = feed.StalenessGate(eng, batch_groups, max_staleness) if batch_groups else None
        writer = EpisodeOutput(out, resume=resume, n=n, group_order=group_order)

        note_images = ImageSearchNote(toolbox)

        def read():
            return (validate(resolve_task_images(rec, where), "task", where)
                    for where, rec in note_images(warn_duplicate_tasks(read_located(files, skip_bad=skip_bad))))

        stdin = not files or any(str(f) == "-" for f in files)
        tasks = feed.passes(read, stdin=stdin, seed=seed, forever=loop)
        total = None if loop else _task_total(files, n, len(writer.done))
        # summary=False: the summary line below sums up
        bar = streams.progress(unit="episodes", desc="rollout", total=total, summary=False)
        if loop and out is None:
            from mars_cli.pipes import exit_when_reader_gone

            # `update --follow --max-steps` ends the loop while it may wait for weights
            exit_when_reader_gone(lambda: _summary(dict(counts), writer.kept, time.perf_counter() - t0))

        def emit(rec: dict) -> None:
            writer.write(rec)
            counts[rec["finish"]] = counts.get(rec["finish"], 0) + 1
            if rec["finish"] == "error" and len(errors) < 3:
                errors.append(f"{rec['group']}/{rec['sample']}: {rec.get('error')}")
            bar.update(1)
            bar.set_postfix(counts, refresh=False)

        agent.run_sync(agent.arun(tasks, n=n, skip=writer.done, emit=emit,
                                  group_of=feed.epoch_group if loop else None, admit=gate))
    finally:
        images.set_decode_mode(decode)
        if writer is not None:
            writer.close()
        if eng is not None:
            eng.close()
        if bar is not None:
            bar.close()
            from mars_cli.pipes import claim_last_words

            if claim_last_words():
                _summary(counts, writer.kept, time.perf_counter() - t0)
    _check_error_rate(counts, errors, max_error_rate)
    return counts


def _summary(counts: dict, kept: int, seconds: float) -> None:
    """The one line every rollout ends with, on stderr, terminal or not."""
    total = sum(counts.values())
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none finished"
    line = f"{total} episodes: {parts} in {seconds:.1f} s"
    if total and seconds > 0:
        line += f" ({total / seconds:.2f}/s)"
    if kept:
        line += f"; {kept} kept from the earlier run"
    streams.summary(line)


def _check_error_rate(counts: dict, errors: list[str], max_rate: float) -> None:
    from mars_cli.errors import MarsError

    total = sum(counts.values())
    bad = counts.get("error", 0)
    if total and bad / total > max_rate:
        raise MarsError(f"{bad} of {total} episodes ended in error, over --max-error-rate {max_rate:g}; first: "
                        + "; ".join(errors))


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
        artifacts: str | None = None, trace: bool = True, protocol: str | None = None,
        on_malformed: str | None = None, workflow: str = "agent", system_prompt: str | None = None) -> dict:
    """`mars ask`: one episode on one image, traced on stderr; returns the trajectory record."""
    from mars_cli.agent.loop import AgentLoop, Limits
    from mars_cli.agent.trace import Tracer
    from mars_cli.errors import MarsError
    from mars_cli import sensenova
    from mars_cli.protocol import get_profile
    from mars_cli.records import make_task

    if not image.startswith(("http://", "https://")):
        if not Path(image).is_file():
            raise MarsError(f"{image}: no such image file")
        from mars_cli.images import image_size

        image_size(image)  # a FIFO or a non-image: one line, before the model loads
    from mars_cli import images

    lim = Limits(**limits)
    decode = images.decode_mode()
    try:
        eng = make_engine(**apply_profile(protocol, engine), sampling=sampling)
    except BaseException:
        images.set_decode_mode(decode)
        raise
    try:
        toolbox = open_toolbox(artifacts_dir(artifacts, None), **tools, profile=protocol, engine=eng)
        if toolbox.image_search is None and not streams.quiet:
            streams.warn(IMAGE_SEARCH_OFF)  # ask always has an image
        tracer = Tracer() if trace else None
        loop = AgentLoop(eng, toolbox, limits=lim, max_inflight=1, on_turn=tracer, profile=protocol,
                         system_prompt=system_prompt, on_malformed=on_malformed, workflow=workflow)
        # A person's question has no dataset: official profiles give it the system prompt every
        # dataset of the official manifests carries (sensenova-eval refuses a task without one).
        meta = {"system_prompt": sensenova.SYSTEM_PROMPT} if get_profile(protocol).official else None
        [rec] = list(loop.run([make_task("ask", question, images=[image], benchmark="ask", meta=meta)]))
    finally:
        images.set_decode_mode(decode)
        eng.close()
    if tracer is not None:
        tracer.summary(rec)
    return rec
