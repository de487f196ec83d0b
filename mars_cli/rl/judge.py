"""The judge stage: per-record accuracy, format reward and their weighted sum.

For every trajectory it writes (replacing them on a re-judge, leaving every other field):
  rewards  {accuracy, format[, tool_cost]}    accuracy null = could not be judged
  reward   accuracy + format_weight·format − tool_cost   (null when accuracy is null)
  judge    {scorer, method, model, verdict, raw, prompt_version, error, weights}

The scorer is the record's `scorer` field unless overridden: em, substring, f1, mcq use
the rules in scorers.py; llm and simpleqa ask the LLM judge, after an exact match has
short-circuited the call. With no judge endpoint they fall back to the rule judge
(em, then containment of a short gold) and say so in `judge.method` ("rule-fallback:…").
An episode without an answer scores 0 without asking anyone.

With an endpoint, LLM calls run concurrently while records stay in input order: a reader
thread parses and rule-scores records and starts their LLM calls on an event loop thread;
the caller receives them in order through a bounded queue (the reorder window), so a
slow call holds back at most `window` records and output streams as calls finish.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from mars_cli.records import validate
from mars_cli.rl import scorers
from mars_cli.rl.llm_judge import AsyncJudge, Verdict, VerdictCache, prompt_version

FIELDS = ("rewards", "reward", "judge")
_READS = ("question", "answers", "choices", "scorer", "prediction", "finish", "tool_calls")
LLM_SCORERS = ("llm", "simpleqa")


@dataclass
class JudgeConfig:
    scorer: str | None = None  # overrides each record's `scorer`
    format_weight: float = 0.5
    tool_cost: float = 0.0  # subtracted per tool call
    base_url: str | None = None  # None: llm-scored records use the rule judge
    model: str | None = None
    api_key: str | None = None
    rubric: str = "binary"
    judge_image: bool = False
    concurrency: int = 32
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5
    cache_dir: str | None = None
    window: int | None = None  # reorder window; default max(256, 4 × concurrency)


@dataclass
class JudgeStats:
    records: int = 0
    missing: int = 0
    llm_calls: int = 0
    cache_hits: int = 0
    fallback: int = 0
    accuracy_sum: float = 0.0

    def summary(self) -> str:
        done = self.records - self.missing
        mean = f"{self.accuracy_sum / done:.4f}" if done else "n/a"
        parts = [f"judged {self.records} records", f"mean accuracy {mean}"]
        if self.llm_calls or self.cache_hits:
            parts.append(f"{self.llm_calls} judge calls, {self.cache_hits} cached")
        if self.fallback:
            parts.append(f"{self.fallback} by the rule judge (no endpoint)")
        if self.missing:
            parts.append(f"{self.missing} could not be judged")
        return ", ".join(parts)


def format_reward(record: dict) -> float:
    """1 when the episode ended in a non-empty answer and every tool call was valid."""
    pred = record.get("prediction")
    if record.get("finish") != "answer" or not isinstance(pred, str) or not pred.strip():
        return 0.0
    return float(all(tc.get("ok") is True for tc in record.get("tool_calls") or []))


@dataclass
class _Pending:
    """A record whose accuracy is known (`info` filled) or awaits the LLM (`call`)."""

    record: dict
    scorer: str
    info: dict
    accuracy: float | None = None
    call: tuple | None = None  # (question, golds, prediction, image, rubric)


def _info(cfg: JudgeConfig, scorer: str, method: str, **kw) -> dict:
    info = {"scorer": scorer, "method": method, "model": "rule", "verdict": None, "raw": None, "prompt_version": None, "error": None}
    info.update(kw)
    info["weights"] = {"format": cfg.format_weight, "tool_cost": cfg.tool_cost}
    return info


def _verdict_word(acc: float) -> str:
    return "correct" if acc == 1.0 else "incorrect" if acc == 0.0 else "partial"


def prepare(record: dict, where, cfg: JudgeConfig) -> _Pending:
    """Rule-score one record, or describe the LLM call it needs."""
    record = validate(record, "trajectory", where, only=_READS)
    scorer = cfg.scorer or record.get("scorer") or "llm"
    golds = record.get("answers") or []
    pred = record["prediction"]
    if pred is None or not pred.strip():
        return _Pending(record, scorer, _info(cfg, scorer, "no-answer", verdict="incorrect"), 0.0)
    if not golds:
        return _Pending(record, scorer, _info(cfg, scorer, "no-gold", error="the task has no gold answers"), None)
    if scorer in scorers.RULE_SCORERS:
        s = scorers.RULE_SCORERS[scorer](pred, golds, record.get("choices"))
        info = _info(cfg, scorer, s.method, verdict=_verdict_word(s.accuracy), **s.detail)
        return _Pending(record, scorer, info, s.accuracy)
    if scorers.exact_match(pred, golds):
        return _Pending(record, scorer, _info(cfg, scorer, "em-shortcut", verdict="correct"), 1.0)
    if not cfg.base_url:
        s = scorers.rule_judge(pred, golds)
        info = _info(cfg, scorer, f"rule-fallback:{s.method}", verdict=_verdict_word(s.accuracy))
        return _Pending(record, scorer, info, s.accuracy)
    rubric = "simpleqa" if scorer == "simpleqa" else cfg.rubric
    images = record.get("images") or []
    image = images[0] if cfg.judge_image and images else None
    return _Pending(record, scorer, {}, None, (record["question"], golds, pred, image, rubric))


def complete(p: _Pending, cfg: JudgeConfig, stats: JudgeStats, verdict: Verdict | None = None) -> dict:
    """Write the judge's fields into the record (replacing earlier ones) and count it."""
    rec = p.record
    if verdict is not None:
        rubric = p.call[4]
        p.accuracy = verdict.accuracy
        p.info = _info(cfg, p.scorer, f"llm:{rubric}", model=cfg.model, verdict=verdict.verdict, raw=verdict.raw,
                       prompt_version=prompt_version(rubric), error=verdict.error, cached=verdict.cached)
        stats.cache_hits += verdict.cached
        stats.llm_calls += not verdict.cached
    elif p.info["method"].startswith("rule-fallback"):
        stats.fallback += 1
    fmt = format_reward(rec)
    rewards = {"accuracy": p.accuracy, "format": fmt}
    cost = 0.0
    if cfg.tool_cost:
        cost = cfg.tool_cost * len(rec.get("tool_calls") or [])
        rewards["tool_cost"] = cost
    rec["rewards"] = rewards
    rec["reward"] = None if p.accuracy is None else p.accuracy + cfg.format_weight * fmt - cost
    rec["judge"] = p.info
    stats.records += 1
    if p.accuracy is None:
        stats.missing += 1
    else:
        stats.accuracy_sum += p.accuracy
    return rec


def judge_records(located: Iterable, cfg: JudgeConfig, stats: JudgeStats | None = None) -> Iterator[dict]:
    """Judge (where, record) pairs; yield the records in input order."""
    stats = stats if stats is not None else JudgeStats()
    if not cfg.base_url:
        for where, rec in located:
            yield complete(prepare(rec, where, cfg), cfg, stats)
        return
    yield from _judge_concurrently(located, cfg, stats)


_END = object()


def _judge_concurrently(located: Iterable, cfg: JudgeConfig, stats: JudgeStats) -> Iterator[dict]:
    if not cfg.model:
        from mars_cli.errors import UsageError

        raise UsageError("a judge endpoint needs a model: --judge-model or MARS_JUDGE_MODEL")
    cache = VerdictCache(cfg.cache_dir) if cfg.cache_dir else None
    judge = AsyncJudge(cfg.base_url, cfg.model, api_key=cfg.api_key, rubric=cfg.rubric, concurrency=cfg.concurrency,
                       timeout=cfg.timeout, retries=cfg.retries, backoff=cfg.backoff, cache=cache)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="judge-loop", daemon=True)
    loop_thread.start()
    window = queue.Queue(maxsize=cfg.window or max(256, 4 * cfg.concurrency))
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                window.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for where, rec in located:
                p = prepare(rec, where, cfg)
                fut = None
                if p.call is not None:
                    if stop.is_set():
                        return
                    q, golds, pred, image, rubric = p.call
                    coro = judge.judge(q, golds, pred, image=image, rubric=rubric)
                    try:
                        fut = asyncio.run_coroutine_threadsafe(coro, loop)
                    except RuntimeError:  # the loop was closed: the command is ending
                        coro.close()
                        return
                if not offer((p, fut)):
                    return
            offer(_END)
        except BaseException as e:  # handed to the consumer, which raises it in order
            offer(e)

    try:
        asyncio.run_coroutine_threadsafe(judge.__aenter__(), loop).result()
        # The copied context carries the program name, so warnings say "mars judge: …".
        reader = threading.Thread(target=contextvars.copy_context().run, args=(read,), name="judge-reader", daemon=True)
        reader.start()
        while True:
            item = window.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            p, fut = item
            yield complete(p, cfg, stats, fut.result() if fut is not None else None)
    finally:
        stop.set()

        async def shutdown() -> None:
            # Cancel the calls still in flight (a Ctrl-C, an error) and wait for them, so
            # none is left pending ("Task was destroyed but it is pending!") at exit.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await judge.__aexit__(None, None, None)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5)
        except BaseException:
            pass
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=5)
        if not loop_thread.is_alive():
            loop.close()  # a reader thread still submitting now fails fast (and closes its coroutine)
        if cache is not None:
            cache.close()
