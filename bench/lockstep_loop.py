"""The lock-step agent loop mars used before the asynchronous one: the baseline of
bench/rollout_async.py, kept verbatim (apart from this paragraph) so the comparison runs
against the real thing. Not used by any command.

Batched multi-turn episodes: the agent loop behind `mars rollout` and `mars ask`.

All live episodes step together: one `engine.generate` call per turn for all of them.
The tool calls of a turn run concurrently on a thread pool while finished episodes are
replaced by new ones from the input (their prompts rendered), then each episode's tool
result is appended and the next turn is generated. Finished trajectories are yielded as
soon as they end, so records stream.

Token-in, token-out: an episode's `ids` are the rendered initial prompt, then for each
turn the exact ids the engine sampled (mask 1, with their log-probs), then the template
tokens of the tool result (protocol.Renderer.continuation, mask 0). Generated text is never
re-tokenized. Images are one placeholder each; the token budget counts each image at the
size it expands to (engine.image_tokens).

Finish reasons: `answer`; `max_turns` (the turn limit was reached without an answer; the
last call is not run); `max_tokens` (the total budget is used up, or a turn was cut at its
token limit without a usable action); `no_action` (a complete turn with neither call nor
answer); `error` (the engine failed for that episode). A malformed call gets an error tool
message and the episode goes on.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from mars_cli import protocol, streams
from mars_cli.agent.toolbox import EpisodeState, Outcome, Toolbox
from mars_cli.engines import Engine, GenRequest, GenResult, strip_eos
from mars_cli.errors import MarsError
from mars_cli.records import task_view


@dataclass
class Limits:
    max_turns: int = 10
    max_total_tokens: int = 16384
    max_new_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_total_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise MarsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass
class Episode:
    record: dict
    sample: int
    messages: list[dict]
    state: EpisodeState
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    turns: int = 0
    used: int = 0  # tokens of the model input so far, images at their expanded size
    finish: str | None = None
    prediction: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)


class AgentLoop:
    """Runs episodes of tasks on one engine with one toolbox."""

    def __init__(self, engine: Engine, toolbox: Toolbox, *, limits: Limits | None = None, batch_size: int = 64,
                 tool_workers: int = 16, system_prompt: str | None = None,
                 on_turn: Callable[[Episode, protocol.Turn, Outcome | None], None] | None = None):
        self.engine = engine
        self.toolbox = toolbox
        self.limits = limits or Limits()
        self.batch_size = max(1, batch_size)
        self.tool_workers = max(1, tool_workers)
        self.system_prompt = system_prompt
        self.on_turn = on_turn  # traces (`mars ask`)
        self._image_cost: dict[str, int] = {}

    # --- public ------------------------------------------------------------------------

    def run(self, tasks: Iterable[dict], n: int = 1, skip: set | None = None) -> Iterator[dict]:
        """Yield one trajectory record per (task, sample), in the order episodes finish.

        `skip` holds (str(task id), sample) pairs not to run (--resume).
        """
        skip = skip or set()
        pending = ((rec, s) for rec in tasks for s in range(n) if (str(rec["id"]), s) not in skip)
        live: list[Episode] = []
        with ThreadPoolExecutor(self.tool_workers, thread_name_prefix="mars-tool") as pool:
            exhausted = False
            while True:
                exhausted, done = self._fill(live, pending, exhausted)
                yield from done
                if not live:
                    if exhausted:
                        return
                    continue
                results = self._generate(live)
                jobs: list[tuple[Episode, bool, Future | Outcome]] = []
                for ep, res in zip(live, results):
                    job = self._take_turn(ep, res, pool)
                    if job is not None:
                        jobs.append((ep, *job))
                # The tools run on the pool while finished episodes are replaced.
                finished = [ep for ep in live if ep.finish]
                live[:] = [ep for ep in live if not ep.finish]
                yield from (self.record(ep) for ep in finished)
                exhausted, done = self._fill(live, pending, exhausted)
                yield from done
                for ep, ended, job in jobs:
                    outcome = job.result() if isinstance(job, Future) else job
                    self._append_result(ep, outcome, ended)
                finished = [ep for ep in live if ep.finish]
                live[:] = [ep for ep in live if not ep.finish]
                yield from (self.record(ep) for ep in finished)

    def record(self, ep: Episode) -> dict:
        """The trajectory record of a finished episode (task fields passed through)."""
        rec = dict(ep.record)
        rec.update({
            "group": ep.record["id"],
            "sample": ep.sample,
            "messages": ep.messages,
            "tool_calls": ep.tool_calls,
            "prediction": ep.prediction,
            "finish": ep.finish,
            "turns": ep.turns,
            "tokens": {"ids": ep.ids, "mask": ep.mask, "logprobs": ep.logprobs, "images": ep.images}
            if self.engine.tokens else None,
            "policy": self.engine.describe(),
            "elapsed": round(time.perf_counter() - ep.started, 4),
        })
        if ep.error is not None:
            rec["error"] = ep.error
        return rec

    # --- steps -------------------------------------------------------------------------

    def _fill(self, live: list[Episode], pending, exhausted: bool):
        """Start episodes until `batch_size` are live; return (exhausted, records of any that ended at once)."""
        done = []
        while not exhausted and len(live) < self.batch_size:
            try:
                rec, s = next(pending)
            except StopIteration:
                return True, done
            ep = self._start(rec, s)
            if ep.finish:
                done.append(self.record(ep))
            else:
                live.append(ep)
        return exhausted, done

    def _start(self, rec: dict, sample: int) -> Episode:
        task = task_view(rec)
        messages = protocol.initial_messages(task, system_prompt=self.system_prompt)
        ep = Episode(record=rec, sample=sample, messages=messages, state=EpisodeState(task=rec))
        if self.engine.tokens:
            try:
                ids, mask, images = self.engine.renderer.render(messages, add_generation_prompt=True)
                ep.ids, ep.mask, ep.images = ids, mask, images
                ep.logprobs = [0.0] * len(ids)
                ep.used = self._cost(len(ids), images)
            except MarsError as e:  # an unreadable task image: this episode fails, the run goes on
                ep.finish, ep.error = "error", str(e)
                return ep
            if ep.used >= self.limits.max_total_tokens:
                ep.finish = "max_tokens"
        return ep

    def _cost(self, n_ids: int, images: list[str]) -> int:
        """Model-input tokens of `n_ids` ids holding `images` placeholders."""
        total = n_ids - len(images)
        for img in images:
            if img not in self._image_cost:
                self._image_cost[img] = int(self.engine.image_tokens(img))
            total += self._image_cost[img]
        return total

    def _generate(self, live: list[Episode]) -> list[GenResult]:
        reqs = []
        for ep in live:
            room = self.limits.max_total_tokens - ep.used
            reqs.append(GenRequest(ids=ep.ids if self.engine.tokens else None, images=list(ep.images),
                                   messages=ep.messages, max_new_tokens=max(1, min(self.limits.max_new_tokens, room))))
        try:
            results = self.engine.generate(reqs)
            if len(results) != len(reqs):
                raise MarsError(f"engine {self.engine.name} returned {len(results)} results for {len(reqs)} requests")
            return results
        except Exception as e:  # noqa: BLE001 — isolate the failing episode, keep the others
            if len(reqs) == 1:
                return [_failed(e)]
            out = []
            for r in reqs:
                try:
                    out.extend(self.engine.generate([r]))
                except Exception as e1:  # noqa: BLE001
                    out.append(_failed(e1))
            return out

    def _take_turn(self, ep: Episode, res: GenResult, pool: ThreadPoolExecutor):
        """Record a generated turn; return (ended_with_eos, tool job) when a tool result must follow."""
        if res.error is not None:
            ep.finish, ep.error = "error", res.error
            return None
        ended = True
        if self.engine.tokens:
            ep.ids += res.ids
            ep.mask += [1] * len(res.ids)
            ep.logprobs += [float(x) for x in res.logprobs]
            ep.used += len(res.ids)
            _, ended = strip_eos(res.ids, self.engine.special["im_end"])
        elif res.usage is not None:
            ep.used = res.usage
        ep.messages.append({"role": "assistant", "content": res.text})
        ep.turns += 1
        turn = protocol.parse_turn(res.text)
        job = None
        if turn.answer is not None:
            ep.finish, ep.prediction = "answer", turn.answer
        elif res.finish == "length" and turn.call is None:
            ep.finish = "max_tokens"
        elif turn.call is None and turn.error is None:
            ep.finish = "no_action"
        elif ep.turns >= self.limits.max_turns:
            ep.finish = "max_turns"
        elif turn.call is not None:
            snapshot = list(ep.messages)  # tools read the conversation as it was at the call
            job = (ended, pool.submit(self._run_call, ep, turn, snapshot))
        else:
            job = (ended, self._malformed(ep, turn))
        if self.on_turn is not None and job is None:
            self.on_turn(ep, turn, None)
        return job

    def _run_call(self, ep: Episode, turn: protocol.Turn, messages: list[dict]) -> Outcome:
        out = self.toolbox.run(turn.call, messages, ep.state)
        ep.tool_calls.append({"turn": ep.turns, "name": turn.call.name, "arguments": turn.call.arguments,
                              "ok": out.ok, "error": out.error, "latency": round(out.latency, 6)})
        if turn.extra_calls:
            _add_note(out.message, protocol.ignored_calls_note(turn.extra_calls))
        if self.on_turn is not None:
            self.on_turn(ep, turn, out)
        return out

    def _malformed(self, ep: Episode, turn: protocol.Turn) -> Outcome:
        raw = turn.raw_call if isinstance(turn.raw_call, dict) else {}
        name = raw.get("name") if isinstance(raw.get("name"), str) else None
        args = raw.get("arguments") if isinstance(raw.get("arguments"), dict) else None
        ep.tool_calls.append({"turn": ep.turns, "name": name, "arguments": args, "ok": False,
                              "error": turn.error, "latency": 0.0})
        out = Outcome(protocol.error_message(turn.error, name), False, turn.error, 0.0)
        if self.on_turn is not None:
            self.on_turn(ep, turn, out)
        return out

    def _append_result(self, ep: Episode, out: Outcome, ended: bool) -> None:
        """Add the tool message (and its template tokens) unless it would exceed the budget."""
        if self.engine.tokens:
            try:
                ids, mask, images = self.engine.renderer.continuation([out.message], ended_with_eos=ended)
                cost = self._cost(len(ids), images)
            except MarsError as e:  # a tool wrote an image the processor cannot read
                ep.finish, ep.error = "error", str(e)
                return
            if ep.used + cost >= self.limits.max_total_tokens:
                ep.finish = "max_tokens"  # no room left to generate after this result
                return
            ep.ids += ids
            ep.mask += mask
            ep.logprobs += [0.0] * len(ids)
            ep.images += images
            ep.used += cost
        ep.messages.append(out.message)


def _failed(e: BaseException) -> GenResult:
    msg = f"{type(e).__name__}: {e}" if not isinstance(e, MarsError) else str(e)
    streams.warn(f"engine failed for an episode: {msg}")
    return GenResult(text="", error=msg)


def _add_note(message: dict, note: str) -> None:
    for part in message.get("content") or []:
        if part.get("type") == "text":
            part["text"] += note
            return
