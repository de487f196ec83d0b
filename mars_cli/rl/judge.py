"""The judge stage: per-record accuracy, format reward and their weighted sum.

For every trajectory it writes (replacing them on a re-judge, leaving every other field):
  rewards  {accuracy, format[, tool_cost]}    accuracy null = could not be judged
  reward   accuracy + format_weight·format − tool_cost   (null when accuracy is null)
  judge    {scorer, method, model, verdict, raw, prompt_version, error, weights}

The scorer is the record's `scorer` field unless overridden: em, substring, f1, mcq use
the rules in scorers.py; llm and simpleqa ask the LLM judge, after an exact match has
short-circuited the call. With no judge endpoint they fall back to the official
exact-match rule (sensenova_eval.exact_match: eval.py's em_check, ASCII normalization),
never to anything more lenient, so an offline score is never above the official
exact-match level; `judge.method` says "em-shortcut" for a match, "rule-fallback:em"
otherwise. An episode without an answer, or one that ended on a malformed turn (finish
"malformed"), scores 0 without asking anyone.

The protocol profile (`--protocol`, else the record's `protocol`) may score by other
rules: `sensenova-eval` (scoring "eval") scores the final reply as inference/eval.py
does: mcq by its A–D cascade, llm by its untagged answer, ASCII exact match, then the
judge with max_tokens 8192, and a judge call that fails after its retries stops the
stage (eval.py:665) instead of scoring 0.

The default rubric is the official one (`sensenova`: the image is sent, one call per gold,
max over golds; see llm_judge.py). Judge health: every LLM request is counted, and
`check_health` fails the stage when fewer than `min_success` of them succeeded, as the
official runs do (≥ 95%), instead of silently training on missing rewards.

Format: 1 when the episode ended in a non-empty answer and every tool call was valid,
where a call that failed for the infrastructure's sake (`infra` in its tool_calls entry: a
backend error, a replay miss, no stored image results) does not count against the model.

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

from mars_cli import protocol, sensenova_eval, streams
from mars_cli.records import validate
from mars_cli.rl import scorers
from mars_cli.rl.llm_judge import AsyncJudge, Verdict, VerdictCache, prompt_version

FIELDS = ("rewards", "reward", "judge")
_READS = ("question", "answers", "choices", "scorer", "prediction", "finish", "tool_calls", "messages")
LLM_SCORERS = ("llm", "simpleqa")


@dataclass
class JudgeConfig:
    scorer: str | None = None  # overrides each record's `scorer`
    format_weight: float = 0.5
    tool_cost: float = 0.0  # subtracted per tool call
    base_url: str | None = None  # None: llm-scored records use the rule judge
    model: str | None = None
    api_key: str | None = None
    rubric: str = "sensenova"
    protocol: str | None = None  # the profile whose scoring rules apply; None: each record's own
    judge_image: bool | None = None  # None: on for the sensenova rubric, off otherwise
    min_success: float = 0.95  # judge health: the least share of LLM requests that must succeed
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
    llm_calls: int = 0  # LLM requests sent
    llm_failed: int = 0  # of which failed after their retries
    cache_hits: int = 0
    fallback: int = 0
    accuracy_sum: float = 0.0
    first_error: str | None = None  # why the first unjudged record could not be judged
    first_failure: str | None = None  # the first LLM judge request that failed after its retries

    def summary(self) -> str:
        done = self.records - self.missing
        mean = f"{self.accuracy_sum / done:.4f}" if done else "n/a"
        parts = [f"judged {self.records} records", f"mean accuracy {mean}"]
        if self.llm_calls or self.cache_hits:
            parts.append(f"{self.llm_calls} judge calls ({self.success_rate:.1%} succeeded), {self.cache_hits} cached")
        if self.fallback:
            parts.append(f"{self.fallback} by the rule judge (no endpoint)")
        if self.missing:
            parts.append(f"{self.missing} could not be judged")
        return ", ".join(parts)


    @property
    def success_rate(self) -> float:
        return 1.0 if not self.llm_calls else (self.llm_calls - self.llm_failed) / self.llm_calls


def check_health(stats: JudgeStats, cfg: "JudgeConfig") -> None:
    """Fail (MarsError) when too few LLM judge requests succeeded; no endpoint, no check."""
    from mars_cli.errors import MarsError

    if not cfg.base_url or not stats.llm_calls or stats.success_rate >= cfg.min_success:
        return
    raise MarsError(f"judge health check failed: {stats.llm_calls - stats.llm_failed} of {stats.llm_calls} LLM judge "
                    f"requests succeeded ({stats.success_rate:.1%}), below --min-judge-success {cfg.min_success:g}; "
                    "the rewards of this batch are not trustworthy (is the judge server overloaded or down?)"
                    + (f"; first failure: {stats.first_failure}" if stats.first_failure else ""))


def format_reward(record: dict) -> float:
    """1 when the episode ended in a non-empty answer and every tool call was valid
    (infrastructure failures, marked `infra`, are not the model's and do not count)."""
    pred = record.get("prediction")
    if record.get("finish") != "answer" or not isinstance(pred, str) or not pred.strip():
        return 0.0
    return float(all(tc.get("ok") is True or tc.get("infra") is True for tc in record.get("tool_calls") or []))


@dataclass
class _Pending:
    """A record whose accuracy is known (`info` filled) or awaits the LLM (`call`)."""

    record: dict
    scorer: str
    info: dict
    accuracy: float | None = None
    call: tuple | None = None  # (question, golds, prediction, image, rubric)
    call_opts: dict | None = None  # the profile's judge call: max_tokens, decode
    abort: bool = False  # a failed judge call stops the stage (the profile's judge.abort_on_failure)


def _info(cfg: JudgeConfig, scorer: str, method: str, **kw) -> dict:
    info = {"scorer": scorer, "method": method, "model": "rule", "verdict": None, "raw": None, "prompt_version": None, "error": None}
    info.update(kw)
    info["weights"] = {"format": cfg.format_weight, "tool_cost": cfg.tool_cost}
    return info


def _verdict_word(acc: float) -> str:
    return "correct" if acc == 1.0 else "incorrect" if acc == 0.0 else "partial"


def _profile(record: dict, where, cfg: JudgeConfig) -> protocol.Profile:
    name = cfg.protocol or record.get("protocol") or protocol.DEFAULT_PROFILE
    if name not in protocol.PROFILES:
        raise where.error(f"unknown protocol {name!r} (known: {', '.join(protocol.PROFILES)})")
    return protocol.PROFILES[name]


def prepare(record: dict, where, cfg: JudgeConfig) -> _Pending:
    """Rule-score one record, or describe the LLM call it needs."""
    record = validate(record, "trajectory", where, only=_READS)
    scorer = cfg.scorer or record.get("scorer") or "llm"
    golds = record.get("answers") or []
    pred = record["prediction"]
    prof = _profile(record, where, cfg)
    if prof.scoring == "eval":
        pred = sensenova_eval.answer_text(sensenova_eval.final_output(record))
    if record.get("finish") == "malformed":
        return _Pending(record, scorer, _info(cfg, scorer, "malformed", verdict="incorrect"), 0.0)
    if pred is None or not pred.strip():
        return _Pending(record, scorer, _info(cfg, scorer, "no-answer", verdict="incorrect"), 0.0)
    empty = scorers.empty_golds(golds)
    if empty:
        streams.warn_once(("empty-gold", record.get("id")), f"{where}: task {record.get('id')!r}: gold answer(s) "
                          f"{', '.join(map(repr, empty))} are empty after normalization and are ignored")
    if len(empty) == len(golds):
        streams.warn_once(("no-gold", record.get("id")), f"{where}: task {record.get('id')!r} has no gold answer: not judged")
        return _Pending(record, scorer, _info(cfg, scorer, "no-gold", error="the task has no gold answers"), None)
    if prof.scoring == "eval" and scorer in ("mcq", "em"):
        return _eval_rule(record, scorer, golds, pred, cfg)
    if scorer in scorers.RULE_SCORERS:
        s = scorers.RULE_SCORERS[scorer](pred, golds, record.get("choices"))
        info = _info(cfg, scorer, s.method, verdict=_verdict_word(s.accuracy), **s.detail)
        return _Pending(record, scorer, info, s.accuracy)
    # Offline the official exact-match rule decides alone: nothing more lenient stands in for the judge.
    exact = sensenova_eval.exact_match if prof.scoring == "eval" or not cfg.base_url else scorers.exact_match
    if exact(pred, golds):
        return _Pending(record, scorer, _info(cfg, scorer, "em-shortcut", verdict="correct"), 1.0)
    if not cfg.base_url:
        return _Pending(record, scorer, _info(cfg, scorer, "rule-fallback:em", verdict="incorrect"), 0.0)
    rubric = "simpleqa" if scorer == "simpleqa" else cfg.rubric
    images = record.get("images") or []
    send = cfg.judge_image if cfg.judge_image is not None else rubric == "sensenova"
    image = images[0] if send and images else None
    opts = {"max_tokens": prof.judge.get("max_tokens"), "decode": prof.decode}
    return _Pending(record, scorer, {}, None, (record["question"], golds, pred, image, rubric), opts,
                    bool(prof.judge.get("abort_on_failure")))


def _eval_rule(record: dict, scorer: str, golds: list, pred: str, cfg: JudgeConfig) -> _Pending:
    """eval.py's em_score_mcq (its A–D cascade on the final reply) or its exact match."""
    if scorer == "mcq":
        letter = sensenova_eval.choice_letter(sensenova_eval.final_output(record))
        acc = float(sensenova_eval.choice_correct(letter, golds))
        return _Pending(record, scorer, _info(cfg, scorer, "eval:mcq", verdict=_verdict_word(acc), extracted=letter), acc)
    acc = float(sensenova_eval.exact_match(pred, golds))
    return _Pending(record, scorer, _info(cfg, scorer, "eval:em", verdict=_verdict_word(acc)), acc)


def complete(p: _Pending, cfg: JudgeConfig, stats: JudgeStats, verdict: Verdict | None = None) -> dict:
    """Write the judge's fields into the record (replacing earlier ones) and count it."""
    rec = p.record
    if verdict is not None:
        rubric = p.call[4]
        p.accuracy = verdict.accuracy
        p.info = _info(cfg, p.scorer, f"llm:{rubric}", model=cfg.model, verdict=verdict.verdict, raw=verdict.raw,
                       prompt_version=prompt_version(rubric), error=verdict.error, cached=verdict.cached,
                       calls=verdict.calls)
        stats.cache_hits += verdict.cached
        stats.llm_calls += verdict.calls
        stats.llm_failed += verdict.failed
        if verdict.failed and p.abort:
            from mars_cli.errors import MarsError

            raise MarsError(f"judge request for {rec.get('id')!r} failed after its retries: {verdict.error}; "
                            f"the official evaluation stops here (nothing is written)")
        if verdict.failed and stats.first_failure is None and verdict.error:
            stats.first_failure = verdict.error
            if p.accuracy is not None:  # (an unjudged record is named below with the same cause)
                streams.warn(f"judge request for {rec.get('id')!r} failed, scored {p.accuracy:g}: {verdict.error}")
    elif p.info["method"].startswith("rule-fallback"):
        stats.fallback += 1
        streams.warn_once("rule-fallback", f"{p.scorer}-scored records are judged by the official exact-match rule "
                          "only: no judge endpoint (--judge-base-url or MARS_JUDGE_BASE_URL)")
    if p.accuracy is None and p.info.get("error") and stats.first_error is None:
        stats.first_error = p.info["error"]
        if p.info["method"] != "no-gold":  # that one was already named with its line
            streams.warn(f"could not judge {rec.get('id')!r}: {p.info['error']}")
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
                    coro = judge.judge(q, golds, pred, image=image, rubric=rubric, **(p.call_opts or {}))
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
