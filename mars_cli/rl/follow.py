"""The resident trainer: `mars update --follow`, one optimizer step per arriving batch.

    follow(paths, UpdateConfig(...), FollowConfig(...), emit=write_metrics) -> steps taken

Input is a stream of scored records stamped by `mars advantage` with `batch: {id, size}`
(stdin or files, read in a background thread so the stages upstream never block on a
full pipe while a step runs). A batch is complete when `size` records with its id have
arrived; it is trained at once, with the policy, reference model and optimizer loaded
once for the whole stream (rl/update.py's load_session/train_step). `emit` gets exactly
one metrics record per optimizer step.

Checkpoints (rl/steps.py): `OUT/step-N/` every `save_every` steps and after the last one,
the newest also holding the optimizer state (`OUT/step-N/optimizer/`), `keep_last` of
them kept. A restart of the same command resumes from the newest one: same weights,
optimizer, step numbering, and the batches it had trained are recognised by id and not
trained twice.

After each step the weights go to the policy servers (`push`): the step's checkpoint, or
for a step that is not saved a weights-only folder (`push_dir`, replaced each time). A
refused push (a server down, a load that failed, a probe that could not run) is a
warning; the next step's push brings every server up to date. Every load is proven
(serve.probe): the trainer's model, as the step left it, scores the tokens each server
sampled on the push probe, in one forward on every rank. A server whose gap exceeds the
bound serves other weights than it reports, and every rollout it serves would train on
wrong log-probs: the step's record is printed (its `push` holds the error and the gap),
the step is saved if it was not, and the trainer stops with exit 1. A restart resumes
from that step once the server is fixed.
While it runs, rank 0 holds a lease on those servers (serve/lease.py) and says "done"
when it ends, so a rollout waiting for weights that will not come ends too.

Staleness of a record = the trainer's step before this one − the step whose weights
sampled it, found from the record's `policy.weight_version` (as servers reported it
after each push) or `policy.fingerprint` (of every checkpoint written or started from).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mars_cli import streams
from mars_cli.errors import MarsError, UsageError
from mars_cli.rl import steps as S
from mars_cli.rl import update as U
from mars_cli.rl.sampled_by import SampledBy

log = logging.getLogger("mars.update")

PUSH_FAILURES = 3  # refused pushes in a row that stop `update --follow --push`
DRAIN_SECONDS = 30.0  # after --max-steps: how long the input may take to end once the lease says "done"


@dataclass
class FollowConfig:
    max_steps: int | None = None
    save_every: int = 1
    keep_last: int = 3  # 0: keep every step folder
    push: list[str] = field(default_factory=list)
    push_dir: str | None = None  # default OUT/.push
    push_max_gap: float | None = None  # the push probe's bound (None: MARS_PUSH_MAX_GAP or serve.probe.MAX_GAP)
    report_to: str = "none"  # --report-to: each step's record also goes to tensorboard or wandb (rank 0)
    logging_dir: str | None = None


def check_follow(cfg: U.UpdateConfig, fcfg: FollowConfig) -> None:
    """Refuse flag combinations before anything is loaded."""
    if cfg.state:
        raise UsageError("--state is not used with --follow: the optimizer state lives in OUT/step-N/optimizer")
    if fcfg.save_every < 1:
        raise UsageError("--save-every must be at least 1")
    if fcfg.keep_last < 0:
        raise UsageError("--keep-last must be 0 (keep all) or more")
    if fcfg.max_steps is not None and fcfg.max_steps < 1:
        raise UsageError("--max-steps must be at least 1")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UsageError(f"{cfg.out}: --out must be a directory with --follow (it holds step-N/ folders)")
    for url in fcfg.push:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--push takes server URLs (http://host:port), got {url!r}")


# --- the input stream ----------------------------------------------------------------------

_END = object()


class Stream:
    """(where, record) items read by a daemon thread, so upstream never blocks on a full pipe."""

    def __init__(self, paths, *, skip_bad: bool):
        import contextvars

        from mars_cli.jsonl import read_located

        self.q: queue.Queue = queue.Queue()
        self.done = threading.Event()
        ctx = contextvars.copy_context()  # warnings keep the "mars update:" prefix
        threading.Thread(target=ctx.run, args=(self._read, read_located(paths, skip_bad=skip_bad)),
                         name="follow-reader", daemon=True).start()

    def _read(self, located) -> None:
        try:
            for item in located:
                self.q.put(item)
            self.q.put(_END)
        except BaseException as e:  # raised by the consumer, in order
            self.q.put(e)
        self.done.set()

    def ended(self) -> bool:
        """Whether everything left is the end of input (so the step just taken is the last)."""
        return self.done.is_set() and self.q.qsize() <= 1

    def __iter__(self):
        """Yields (item, seconds waited for it); says so every progress interval while it waits."""
        from mars_cli.progress import _interval, duration

        every = _interval() if streams.progress_enabled() else 0
        taken = 0
        while True:
            t = time.perf_counter()
            while True:
                try:
                    item = self.q.get(timeout=every if every >= 1 else None)
                    break
                except queue.Empty:
                    streams.warn(f"waiting for input ({duration(time.perf_counter() - t)}), "
                                 f"{taken} records read; a step takes each complete batch")
            waited = time.perf_counter() - t
            taken += 1
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item, waited


def _stamp(where, rec) -> tuple[str, int]:
    b = rec.get("batch")
    if not (isinstance(b, dict) and isinstance(b.get("id"), str) and isinstance(b.get("size"), int)
            and not isinstance(b.get("size"), bool) and b["size"] >= 1):
        raise where.error("record has no batch stamp {id, size}: --follow steps on the batches `mars advantage` writes")
    return b["id"], b["size"]


def batches(items):
    """Complete batches as (id, size, [(where, record)], seconds waited for them)."""
    open_: dict[str, list] = {}
    waited = 0.0
    for (where, rec), w in items:
        waited += w
        bid, size = _stamp(where, rec)
        got = open_.setdefault(bid, [])
        if got and _stamp(*got[0])[1] != size:
            raise where.error(f"batch {bid} says size {size}, its first record said {_stamp(*got[0])[1]}")
        got.append((where, rec))
        if len(got) == size:
            del open_[bid]
            yield bid, size, got, waited
            waited = 0.0
    for bid, got in open_.items():
        raise MarsError(f"input ended inside batch {bid} ({len(got)} of {_stamp(*got[0])[1]} records, "
                        f"first at {got[0][0]}): not trained")


# --- one batch -----------------------------------------------------------------------------

def trainable(examples, vocab_size: int) -> tuple[list, int]:
    """Refuse ids beyond the vocabulary; drop trajectories with no policy token (warned)."""
    for ex in examples:
        bad = next((t for t in ex.ids if t >= vocab_size), None)
        if bad is not None:
            raise ex.where.error(f"token id {bad} is beyond the policy's vocabulary ({vocab_size} ids): "
                                 "was this batch sampled by another model?")
    keep = [ex for ex in examples if ex.policy_tokens > 0]
    for ex in examples:
        if ex.policy_tokens == 0:
            streams.warn(f"{ex.where}: trajectory has no policy tokens (mask all 0, e.g. a prompt over the "
                         "token budget): skipped")
    return keep, len(examples) - len(keep)


def _has_policy_tokens(rec: dict) -> bool:
    """False only for a well-formed all-zero mask (malformed tokens are reported by the reader)."""
    tok = rec.get("tokens")
    mask = tok.get("mask") if isinstance(tok, dict) else None
    return not isinstance(mask, list) or any(mask)


def staleness(records, at_step: int, by_version: dict, by_fingerprint: dict) -> dict:
    """How many steps behind the trainer's weights the weights that sampled each record are."""
    lags = []
    for rec in records:
        pol = rec.get("policy") if isinstance(rec.get("policy"), dict) else {}
        v, fp = pol.get("weight_version"), pol.get("fingerprint")
        s = by_version.get(str(v)) if v is not None else None
        if s is None and fp is not None:
            s = by_fingerprint.get(fp)
        if s is not None:
            lags.append(at_step - s)
    if not lags:
        return {"mean": None, "max": None, "min": None, "known": 0}
    return {"mean": sum(lags) / len(lags), "max": max(lags), "min": min(lags), "known": len(lags)}


def _push(session, fcfg: FollowConfig, checkpoint: str, fp: str | None) -> tuple[dict, list, str | None]:
    """Push on rank 0, the probe's reference forward on every rank (a ZeRO-3 forward is collective).

    Returns (the record's `push`, the servers' weight versions, the message to stop with or None)."""
    trainer = session.trainer

    def score(probes):
        from mars_cli.serve.probe import reference_logprobs

        return reference_logprobs(session.policy, probes, model=trainer.model)

    if trainer.rank != 0:
        probes = _shared(trainer, None)  # what rank 0's reference() sends
        if probes:
            score(probes)
        return _shared(trainer, None)
    sent = []

    def reference(probes):
        sent.append(True)
        return score(_shared(trainer, probes))

    try:
        out = _push_here(fcfg, checkpoint, fp, reference)
    finally:
        if not sent:
            _shared(trainer, [])  # no probe to score: release the other ranks
    return _shared(trainer, out)


def _push_here(fcfg: FollowConfig, checkpoint: str, fp: str | None, reference) -> tuple[dict, list, str | None]:
    from mars_cli.serve.push import ProbeError, PushError, push_checkpoint

    t = time.perf_counter()
    try:
        res = push_checkpoint(fcfg.push, checkpoint, fingerprint=fp, api_key=os.environ.get("MARS_SERVE_API_KEY"),
                              reference=reference, max_gap=fcfg.push_max_gap)
    except PushError as e:
        push = {"ok": False, "error": str(e), "seconds": round(time.perf_counter() - t, 3), **_probe_summary(e.results)}
        if isinstance(e, ProbeError):
            return push, [], f"{e}; stopping: rollouts from that server would train on wrong log-probs"
        streams.warn(f"push of {checkpoint} failed: {e}; training goes on, the next step pushes again")
        return push, [], None
    versions = [r.get("weight_version") for r in res if r.get("weight_version") is not None]
    return {"ok": True, "servers": len(res), "weight_version": max(versions) if versions else None,
            "seconds": round(time.perf_counter() - t, 3), **_probe_summary(res)}, versions, None


def _probe_summary(results: list[dict]) -> dict:
    """The record's `probe`: the largest gap over the servers that answered it, and the bound."""
    probes = [r["probe"] for r in results if isinstance(r.get("probe"), dict)]
    if not probes:
        return {}
    return {"probe": {"gap": max(p["gap"] for p in probes), "bound": probes[0]["bound"],
                      "servers": {r["url"]: r["probe"]["gap"] for r in results if isinstance(r.get("probe"), dict)}}}


# --- the loop ------------------------------------------------------------------------------

def follow(paths, cfg: U.UpdateConfig, fcfg: FollowConfig, *, emit: Callable[[dict], None],
           skip_bad: bool = False, on_push: Callable[[bool], None] | None = None) -> int:
    """Train every batch of the stream as it completes; return the number of steps taken.

    `on_push(ok)` after each push (the lease: serve.lease.Heartbeat.pushed). PUSH_FAILURES
    refused pushes in a row stop the run (exit 1, the step saved): the servers serve ever
    older weights, and the rollouts that feed it would only drift further off-policy."""
    from mars_cli.models.load import fingerprint as dir_fingerprint

    U._check_flags(cfg)
    check_follow(cfg, fcfg)
    if fcfg.push:
        try:
            import mars_cli.serve.push  # noqa: F401
        except ImportError:
            raise UsageError("--push needs the policy server's push client (mars_cli.serve.push), "
                             "which this build lacks") from None
    out = Path(cfg.out)
    origin_fp = dir_fingerprint(cfg.policy)
    resume = S.find_resume(out, origin_fp)
    session = U.load_session(cfg, policy_path=str(resume.path) if resume else None)
    trainer, rank = session.trainer, session.trainer.rank
    state = S.RunState(origin=origin_fp)
    if resume:
        U.resume_state(trainer, str(resume.path / S.OPTIMIZER), session.policy)
        state = S.RunState.from_meta(resume.meta, origin_fp)
        streams.warn(f"resuming from {resume.path} (step {state.step}); "
                     f"{sum(state.batches.values())} batch(es) already trained are skipped if they come again")
        lost = S.unprinted(resume.path) if rank == 0 else None
        if lost is not None:  # stopped between saving that step and printing its record
            emit({**lost, "recovered": "printed on resume: the run stopped after saving this step"})
            S.printed(resume.path)
    else:
        state.fingerprints[session.policy.fingerprint] = 0
    to_skip = dict(state.batches)
    parent_meta_step = int(S.read_meta(cfg.policy).get("step", 0))
    parent_path, parent_fp = (str(resume.path), resume.fingerprint) if resume else (cfg.policy, session.policy.fingerprint)
    push_dir = Path(fcfg.push_dir) if fcfg.push_dir else out / ".push"
    taken = 0
    failed_pushes = 0  # in a row
    last: dict | None = None  # the step to save if the stream ends before it was saved

    def save(n: int, examples, metrics: dict) -> tuple[str, str, int]:
        """Write OUT/step-n with the optimizer state; returns (path, fingerprint, bytes written)."""
        path = out / S.step_name(n)
        fp = U.write_checkpoint(session, str(path), examples, metrics, parent=parent_path,
                                parent_fingerprint=parent_fp, step=parent_meta_step + n, extra={"run_step": n})
        state.fingerprints[fp] = n
        trainer.save_state(str(path / S.OPTIMIZER), state.to_meta(n, fp, str(path)))
        if rank == 0:
            S.prune(out, n, fcfg.keep_last)
        trainer.barrier()
        return str(path), fp, S.tree_bytes(path)

    stream = Stream(paths, skip_bad=skip_bad) if rank == 0 else None
    with _rank0_decides(trainer):  # SIGTERM on the other ranks waits for rank 0's end of the stream
        stepping = False  # inside an optimizer step: the weights in memory may be half-updated
        try:
            for bid, size, located, waited in _shared_batches(trainer, batches(stream) if rank == 0 else None):
                if to_skip.get(bid, 0) > 0:
                    to_skip[bid] -= 1
                    streams.warn(f"batch {bid} ({size} records) was trained before step {state.step}: skipped")
                    continue
                t0 = time.perf_counter()
                records = [rec for _, rec in located]
                if not any(_has_policy_tokens(r) for r in records):
                    streams.warn(f"batch {bid} ({located[0][0]}…): no trajectory has policy tokens: no step")
                    continue
                sampled_by = SampledBy()
                examples, _ = trainable(U.read_examples(iter(located), session, sampled_by), session.vocab_size)
                skipped = len(located) - len(examples)  # by trainable() or by batching.update_examples itself
                if not examples:
                    streams.warn(f"batch {bid}: no trajectory with policy tokens: no step")
                    continue
                lag = staleness(records, state.step, state.versions, state.fingerprints)
                stepping = True  # until the step is recorded: `last` does not describe the weights meanwhile
                metrics = U.train_step(session, examples)
                metrics["sampled_by"] = sampled_by.report(parent_fp)
                metrics["rewards"] = sampled_by.rewards()
                state.step += 1
                state.batches[bid] = state.batches.get(bid, 0) + 1
                n = state.step
                timing = {k: metrics.pop(k) for k in ("train_seconds", "train_cpu_seconds")}
                ck, fp, written, t_save = None, None, 0, time.perf_counter()
                final = _shared(trainer, (fcfg.max_steps is not None and taken + 1 >= fcfg.max_steps)
                                or (stream is not None and stream.ended()))
                if n % fcfg.save_every == 0 or final:
                    ck, fp, written = save(n, examples, metrics)
                    last = None
                else:
                    last = {"n": n, "examples": examples, "metrics": dict(metrics)}
                save_seconds = time.perf_counter() - t_save
                record = {"kind": "update", "step": n, "out": ck, "fingerprint": fp, "batch": {"id": bid, "size": size},
                          "skipped": skipped, "staleness": lag, **metrics}
                if ck and rank == 0:
                    S.keep_unprinted(Path(ck), record)
                push, stop = None, None
                if fcfg.push:
                    t_push = time.perf_counter()
                    target, tfp = ck, fp
                    if target is None:  # weights only, replaced each step
                        tfp = U.write_checkpoint(session, str(push_dir), examples, metrics, parent=parent_path,
                                                 parent_fingerprint=parent_fp, step=parent_meta_step + n, extra={"run_step": n})
                        target = str(push_dir)
                        written += S.tree_bytes(push_dir)
                        state.fingerprints[tfp] = n
                    push, versions, stop = _push(session, fcfg, target, tfp)
                    for v in versions:
                        state.versions[str(v)] = n
                    failed_pushes = 0 if push.get("ok") else failed_pushes + 1
                    if failed_pushes >= PUSH_FAILURES and stop is None:
                        stop = (f"{failed_pushes} pushes in a row failed (the last: {push.get('error')}); stopping: "
                                "the servers would go on serving ever older weights")
                    if on_push is not None and rank == 0:
                        on_push(bool(push.get("ok")))
                    push["write_seconds"] = round(time.perf_counter() - t_push - push["seconds"], 3)
                state.trim()
                parent_path, parent_fp = (ck, fp) if ck else (parent_path, None)
                taken += 1
                if push is not None:
                    record["push"] = push
                record.update(seconds=round(time.perf_counter() - t0, 3), wait_seconds=round(waited, 3), **timing,
                              save_seconds=round(save_seconds, 3), bytes_written=written)
                stepping = False
                if rank == 0:
                    emit(record)
                    if ck:
                        S.printed(Path(ck))
                if stop:
                    raise MarsError(stop)  # after the record; the handler below saves an unsaved step
                log.info(f"step {n}: batch {bid} ({size} records) loss {metrics['loss']:.4g} in {record['seconds']} s")
                if fcfg.max_steps is not None and taken >= fcfg.max_steps:
                    break
        except (MarsError, KeyboardInterrupt):
            # Bad data or Ctrl-C between steps: the weights in memory are those of the last
            # whole step, so a step not yet saved (--save-every) is saved before exiting.
            if last is not None and not stepping:
                save(last["n"], last["examples"], last["metrics"])
            raise
        if last is not None:  # the stream ended: the last step is always saved
            save(last["n"], last["examples"], last["metrics"])
    return taken


def run_command(paths, cfg: U.UpdateConfig, fcfg: FollowConfig, *, nproc: int, local_rank: int | None,
                skip_bad: bool) -> int:
    """`mars update --follow`: relaunch as `nproc` ranks (rank 0 reads the stream, stdin too) or
    train here, writing the metrics records to stdout; the exit status."""
    from mars_cli.jsonl import RecordWriter
    from mars_cli.rl.engine import config_argv, relaunch, under_launcher

    check_follow(cfg, fcfg)
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if nproc > 1 and not under_launcher():
        extra = ["--follow", "--save-every", str(fcfg.save_every), "--keep-last", str(fcfg.keep_last)]
        extra += ["--max-steps", str(fcfg.max_steps)] if fcfg.max_steps else []
        extra += ["--push", ",".join(fcfg.push)] if fcfg.push else []
        extra += ["--push-dir", fcfg.push_dir] if fcfg.push_dir else []
        extra += ["--push-max-gap", repr(fcfg.push_max_gap)] if fcfg.push_max_gap is not None else []
        extra += ["--report-to", fcfg.report_to] + (["--logging-dir", fcfg.logging_dir] if fcfg.logging_dir else [])
        return relaunch(nproc, "update", [*paths, *config_argv(cfg), *extra, *(["--skip-bad"] if skip_bad else [])])
    from mars_cli.tracking import open_tracker, run_settings

    rank0 = int(os.environ.get("RANK", "0")) == 0
    lease = None
    if rank0 and fcfg.push:
        try:
            from mars_cli.serve.lease import Heartbeat
        except ImportError:  # a build without the server side: pushes go on, rollouts are not told
            Heartbeat = None
        if Heartbeat is not None:
            # the rollouts sampling from these servers wait for weights only while this runs
            lease = Heartbeat(fcfg.push, api_key=os.environ.get("MARS_SERVE_API_KEY") or None)
    try:
        with RecordWriter() as w, open_tracker(fcfg.report_to if rank0 else "none", logging_dir=fcfg.logging_dir,
                                               command="update", config=run_settings()) as tracker:
            emitted = []

            def emit(rec: dict) -> None:  # live, one step at a time: a resident run lasts for days
                w.write(rec)
                tracker.log(rec, step=rec.get("step"), prefix="train/")
                emitted.append(rec.get("step"))

            t0 = time.perf_counter()
            try:
                taken = follow(paths, cfg, fcfg, emit=emit, skip_bad=skip_bad,
                               on_push=lease.pushed if lease is not None else None)
            except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the last whole step saved, then say so
                if rank0:
                    from mars_cli.errors import stop_word

                    _follow_summary(len(emitted), t0, stop_word(e))
                raise
        if rank0:
            why = "--max-steps reached" if fcfg.max_steps is not None and taken >= fcfg.max_steps else "the input ended"
            _follow_summary(taken, t0, why)
    finally:
        if lease is not None:
            lease.close()  # "done": a rollout held back for the next weights ends now
    reader = next((t for t in threading.enumerate() if t.name == "follow-reader" and t.is_alive()), None)
    if reader is not None and lease is not None:
        # --max-steps with the input still open: the lease's "done" ends the rollouts that
        # feed this run, and the stages between end on their input. Reading on until they
        # have (bounded) lets each stage end on its input, with its summary, rather than
        # on a closed pipe (which `tee` between stages only notices when it next writes).
        reader.join(DRAIN_SECONDS)
    if reader is not None and reader.is_alive():
        # The reader thread is blocked in a read of stdin, whose lock Python's shutdown
        # would wait for. Everything is saved and the records are flushed, so end here;
        # the stages upstream then end on the closed pipe.
        import sys

        streams.close_records()
        sys.stderr.flush()
        os._exit(0)
    return 0


@contextlib.contextmanager
def _rank0_decides(trainer):
    """On ranks other than 0 of a multi-rank run, SIGTERM is noted, not raised: rank 0 (which
    gets it too, from the launcher) ends the shared stream, every rank saves the last step
    together, and then this rank ends as terminated. Raised at once, it would interrupt the
    rank's wait for the next batch and its collectives would no longer match rank 0's."""
    import signal

    from mars_cli.errors import TERM_GRACE_S, Terminated

    if trainer.world == 1 or trainer.rank == 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []

    def on_term(signum, frame):
        if not noted:  # a rank 0 that never ends the stream: ended after the grace
            timer = threading.Timer(TERM_GRACE_S, os._exit, args=(143,))
            timer.daemon = True
            timer.start()
        noted.append(signum)

    before = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
    if noted:
        raise Terminated()


def _follow_summary(taken: int, t0: float, why: str) -> None:
    from mars_cli.progress import duration

    streams.summary(f"follow: {taken} step{'s' * (taken != 1)} in {duration(time.perf_counter() - t0)} ({why})")


def _shared_batches(trainer, local):
    """Rank 0 reads the stream; every rank gets each complete batch (None ends it)."""
    if trainer.world == 1:
        yield from local
        return
    while True:
        stop = None
        item = None
        if trainer.rank == 0:
            try:
                item = next(local, None)
            except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while reading: the other ranks,
                stop = e                    # waiting for this batch, learn that the stream ended,
        item = _shared(trainer, item)       # and save the last step together with this one
        if stop is not None:
            raise stop
        if item is None:
            return
        yield item


def _shared(trainer, value):
    return U._shared(trainer, value)
