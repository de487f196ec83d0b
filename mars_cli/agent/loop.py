"""Asynchronous multi-turn episodes: the agent loop behind `mars rollout` and `mars ask`.

Every episode is its own task under one event loop (`AgentLoop.arun`): it asks the engine
for a turn (`await engine.agenerate`), runs the tool call on a bounded thread pool, appends
the result and asks for the next turn the moment it is back. No episode waits for
another's generation or tools; in-process engines still batch on the GPU, because their
`agenerate` micro-batches whatever requests are pending (engines/__init__.py). At most
`max_inflight` episodes are live; a new one starts as soon as one ends. Each finished
trajectory goes to `emit` at once, from the loop's thread, so a record is written whole
or not at all: cancelling the run (Ctrl-C) loses only unfinished episodes.

Token-in, token-out: an episode's `ids` are the rendered initial prompt, then for each
turn the exact ids the engine sampled (mask 1, with their log-probs), then the template
tokens of the tool result (protocol.Renderer.continuation, mask 0). Generated text is never
re-tokenized. Images are one placeholder each; budgets count each image at the size it
expands to (engine.image_tokens).

Budgets (as the official run): the first prompt gets `max_prompt_tokens`; everything after
it (generated turns AND tool results) shares `max_response_tokens`; `max_total_tokens`, when
set, caps the two together. A budget set to None is no budget (the `sensenova-eval`
profile's default, as eval.py has none). A first prompt that does not fit ends the episode
`error`, saying how many tokens it needed: it is never run silently cut.

Finish reasons: `answer`; `max_turns` (the turn limit was reached without an answer; the
last call is not run, unless the profile says `last_call_runs`, as eval.py does); `max_tokens` (the response budget is used up, or a turn was cut at
its token limit without a usable action); `no_action` (a complete turn with neither call
nor answer); `malformed` (a malformed call under `on_malformed="end"`); `error` (the engine
failed for that episode, its prompt cannot fit, or the profile's rules fail the sample: a
task without the system prompt it needs, a call eval.py cannot run). With `on_malformed="observe"` a
malformed call gets an error tool message and the episode goes on.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from mars_cli import protocol, streams
from mars_cli.agent import workflow as wf
from mars_cli.agent.toolbox import EpisodeState, Outcome, Toolbox
from mars_cli.engines import Engine, GenRequest, GenResult, strip_eos
from mars_cli.errors import MarsError, UsageError
from mars_cli.records import task_view


@dataclass
class Limits:
    max_turns: int = 10
    max_prompt_tokens: int | None = 16384  # None: no budget
    max_response_tokens: int | None = 16384  # None: no budget
    max_total_tokens: int | None = None  # optional cap on prompt + response
    max_new_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_prompt_tokens", "max_response_tokens", "max_total_tokens", "max_new_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


@dataclass
class Episode:
    record: dict
    sample: int
    group: str
    messages: list[dict]
    state: EpisodeState
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    turns: int = 0
    prompt: int = 0  # model-input tokens of the first prompt, images expanded
    used: int = 0  # model-input tokens so far (prompt + response)
    finish: str | None = None
    prediction: str | None = None
    error: str | None = None
    versions: list = field(default_factory=list)  # (weight_version, fingerprint) of each turn
    rag: dict | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def response(self) -> int:
        return self.used - self.prompt


async def _terminable(coro: Awaitable, hit: list):
    """`coro`, cancelled on SIGTERM as asyncio.Runner cancels it on Ctrl-C (the episodes'
    cleanup runs); `hit` then says so, for the caller to raise Terminated off the loop."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return await coro
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    before = signal.getsignal(signal.SIGTERM)

    def on_term() -> None:
        hit.append(True)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    try:
        return await coro
    except asyncio.CancelledError:
        if not hit:
            raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, before)


class AgentLoop:
    """Runs episodes of tasks on one engine with one toolbox."""

    def __init__(self, engine: Engine, toolbox: Toolbox, *, limits: Limits | None = None, max_inflight: int = 64,
                 batch_size: int | None = None, tool_workers: int = 16, system_prompt: str | None = None,
                 on_turn: Callable[[Episode, protocol.Turn, Outcome | None], None] | None = None,
                 profile: str | None = None, on_malformed: str | None = None, workflow: str = "agent"):
        if workflow not in wf.WORKFLOWS:
            raise UsageError(f"unknown --workflow {workflow!r} (choose from {', '.join(wf.WORKFLOWS)})")
        self.engine = engine
        self.toolbox = toolbox
        self.limits = limits or Limits()
        self.max_inflight = max(1, batch_size if batch_size is not None else max_inflight)
        self.tool_workers = max(1, tool_workers)
        self.system_prompt = system_prompt
        self.on_turn = on_turn  # traces (`mars ask`)
        self.profile = profile
        self.prof = protocol.get_profile(profile)
        self.on_malformed = on_malformed or wf.default_on_malformed(profile)
        if self.on_malformed not in ("end", "observe"):
            raise UsageError(f"--on-malformed must be end or observe, got {self.on_malformed!r}")
        self.workflow = workflow
        if workflow != "agent":
            self.limits = Limits(**{**self.limits.__dict__, "max_turns": 1})
        self._image_cost: dict[str, int] = {}
        self._tools: ThreadPoolExecutor | None = None
        self.fatal: str | None = None  # the engine is gone: no new episodes start

    # --- public ------------------------------------------------------------------------

    def run(self, tasks: Iterable[dict], n: int = 1, skip: set | None = None) -> list[dict]:
        """Every trajectory of (task, sample) pairs, in the order episodes finish (blocking)."""
        out: list[dict] = []
        self.run_sync(self.arun(tasks, n=n, skip=skip, emit=out.append))
        return out

    def run_sync(self, coro: Awaitable):
        """Run `coro` on a fresh event loop that owns every thread it starts."""
        with asyncio.Runner() as runner:
            # generation of chat engines and the input reader run on the default executor
            runner.get_loop().set_default_executor(
                ThreadPoolExecutor(self.max_inflight + 2, thread_name_prefix="mars-engine"))
            hit: list = []
            result = runner.run(_terminable(coro, hit))
        if hit:  # SIGTERM: the command's own ending (main.run), once the loop is closed
            from mars_cli.errors import Terminated

            raise Terminated()
        return result

    async def arun(self, tasks: Iterable[dict], *, n: int = 1, skip: set | None = None,
                   emit: Callable[[dict], None], group_of: Callable[[dict], str] | None = None,
                   admit: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Run every (task, sample) not in `skip`; `emit(record)` as each finishes.

        `tasks` is read lazily (at most max_inflight records ahead) off the loop's thread; an exception it
        raises (a bad input line) stops new episodes, lets the started ones finish and
        emit, and is then re-raised. `admit(k)` is awaited before the k-th group starts
        (--max-staleness); one that raises feed.InputEnd ends the run, cancelling the unfinished
        episodes. When the engine itself fails, no new episode starts and
        MarsError is raised after the live ones end.
        """
        from mars_cli.agent.feed import InputEnd, prefetch

        skip = skip or set()
        self.fatal = None
        group_of = group_of or (lambda rec: str(rec["id"]))
        slots = asyncio.Semaphore(self.max_inflight)
        self._tools = ThreadPoolExecutor(self.tool_workers, thread_name_prefix="mars-tool")
        input_error: BaseException | None = None
        running: set = set()
        try:
            async with asyncio.TaskGroup() as tg:
                async with prefetch(tasks, ahead=self.max_inflight) as items:
                    k = 0
                    while self.fatal is None:
                        try:
                            rec = await items.next()
                        except StopAsyncIteration:
                            break
                        except MarsError as e:
                            input_error = e
                            break
                        self.fatal = self.fatal or self.engine.lost()
                        if self.fatal is not None:
                            break
                        group = group_of(rec)
                        samples = [s for s in range(n) if (group, s) not in skip]
                        if not samples:
                            continue
                        if admit is not None:
                            try:
                                await admit(k)
                            except InputEnd as e:  # no use for more episodes: end, dropping the unfinished
                                streams.warn(str(e))
                                for task in running:
                                    task.cancel()
                                break
                        k += 1
                        for s in samples:
                            await slots.acquire()
                            if self.fatal is not None:
                                slots.release()
                                break
                            task = tg.create_task(self._episode(rec, s, group, slots, emit))
                            running.add(task)
                            task.add_done_callback(running.discard)
        finally:
            self._tools.shutdown(wait=False, cancel_futures=True)
            await self.engine.aclose()  # a remote engine's HTTP client belongs to this loop
        if input_error is not None:
            raise input_error
        if self.fatal is None:  # every server died under requests already in flight
            self.fatal = self.engine.lost()
        if self.fatal is not None:
            raise MarsError(self.fatal)

    def record(self, ep: Episode) -> dict:
        """The trajectory record of a finished episode (task fields passed through)."""
        rec = dict(ep.record)
        policy = self.engine.describe()
        if ep.versions:
            # the oldest weights that sampled any of its tokens: what staleness is measured from
            oldest = min(ep.versions, key=lambda v: (v[0] is None, v[0] if v[0] is not None else 0))
            if oldest[0] is not None:
                policy["weight_version"] = oldest[0]
                if len({v[0] for v in ep.versions}) > 1:
                    policy["weight_versions"] = [v[0] for v in ep.versions]
            if oldest[1] is not None:
                policy["fingerprint"] = oldest[1]
        rec.update({
            "group": ep.group,
            "sample": ep.sample,
            "messages": ep.messages,
            "tool_calls": ep.tool_calls,
            "prediction": ep.prediction,
            "finish": ep.finish,
            "turns": ep.turns,
            "tokens": {"ids": ep.ids, "mask": ep.mask, "logprobs": ep.logprobs, "images": ep.images}
            if self.engine.tokens else None,
            "policy": policy,
            "protocol": self.prof.name,
            "elapsed": round(time.perf_counter() - ep.started, 4),
        })
        if self.workflow != "agent":
            rec["workflow"] = self.workflow
        if ep.rag is not None:
            rec["rag"] = ep.rag
        if ep.error is not None:
            rec["error"] = ep.error
        return rec

    # --- one episode ---------------------------------------------------------------------

    async def _episode(self, rec: dict, sample: int, group: str, slots: asyncio.Semaphore, emit) -> None:
        ep = Episode(record=rec, sample=sample, group=group, messages=[], state=EpisodeState(task=rec))
        try:
            ep = await self._start(rec, sample, group)
            while ep.finish is None:
                await self._step(ep)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 — a bug in one episode must not end a long rollout
            streams.warn(f"episode {group}/{sample} failed: {type(e).__name__}: {e}")
            ep.finish, ep.error = "error", f"internal error: {type(e).__name__}: {e}"
        finally:
            slots.release()
        emit(self.record(ep))

    async def _start(self, rec: dict, sample: int, group: str) -> Episode:
        task = task_view(rec)
        try:
            messages = wf.initial_messages(task, workflow=self.workflow, profile=self.profile,
                                           system_prompt=self.system_prompt)
        except MarsError as e:  # the profile refuses this task (no dataset system prompt): it fails alone
            return Episode(record=rec, sample=sample, group=group, messages=[], state=EpisodeState(task=rec),
                           finish="error", error=str(e))
        ep = Episode(record=rec, sample=sample, group=group, messages=messages, state=EpisodeState(task=rec))
        if self.workflow == "rag":
            text, ep.rag = await asyncio.get_running_loop().run_in_executor(self._tools, wf.retrieve, self.toolbox, rec)
            wf.prepend_text(messages, text)
        if not self.engine.tokens:
            return ep
        try:
            ids, mask, images = self.engine.renderer.render(messages, add_generation_prompt=True)
            ep.ids, ep.mask, ep.images = ids, mask, images
            ep.logprobs = [0.0] * len(ids)
            ep.used = ep.prompt = self._cost(len(ids), images)
        except MarsError as e:  # an unreadable task image: this episode fails, the run goes on
            ep.finish, ep.error = "error", str(e)
            return ep
        lim, cap = self.limits, self.engine.max_images
        if cap is not None and len(images) > cap:
            ep.finish, ep.error = "error", f"the task has {len(images)} images; the engine takes at most {cap} per episode"
        elif lim.max_prompt_tokens is not None and ep.prompt > lim.max_prompt_tokens:
            ep.finish, ep.error = "error", (f"the first prompt needs {ep.prompt} tokens (images expanded), over "
                                            f"--max-prompt-tokens {lim.max_prompt_tokens}; lower --max-pixels or raise the limit")
        elif lim.max_total_tokens is not None and ep.prompt >= lim.max_total_tokens:
            ep.finish, ep.error = "error", (f"the first prompt needs {ep.prompt} tokens (images expanded), leaving no room "
                                            f"under --max-total-tokens {lim.max_total_tokens}")
        return ep

    def _room(self, ep: Episode) -> float:
        """Tokens the episode may still add after its first prompt (inf: no budget)."""
        room = float("inf")
        if self.limits.max_response_tokens is not None:
            room = self.limits.max_response_tokens - ep.response
        if self.limits.max_total_tokens is not None:
            room = min(room, self.limits.max_total_tokens - ep.used)
        return room

    async def _step(self, ep: Episode) -> None:
        room = self._room(ep)
        if room < 1:
            ep.finish = "max_tokens"
            return
        req = GenRequest(ids=ep.ids if self.engine.tokens else None, images=list(ep.images), messages=ep.messages,
                         max_new_tokens=int(min(self.limits.max_new_tokens, room)))
        try:
            res = await self.engine.agenerate(req)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 — the engine is gone: end this episode and the run
            msg = str(e) if isinstance(e, MarsError) else f"{type(e).__name__}: {e}"
            if self.fatal is None:
                self.fatal = msg
            ep.finish, ep.error = "error", msg
            return
        action = self._take_turn(ep, res)
        if action is None:
            return
        ended, turn = action
        if turn.call is not None:
            snapshot = list(ep.messages)  # tools read the conversation as it was at the call
            out = await asyncio.get_running_loop().run_in_executor(
                self._tools, self.toolbox.run, turn.call, snapshot, ep.state)
            self._record_call(ep, turn, out)
        else:
            out = self._malformed(ep, turn)
            # Only a turn that cannot be read ends the episode (protocol.is_malformed), as in the
            # official loop; an unknown tool or bad arguments get an error result there too.
            if self.on_malformed == "end" and protocol.is_malformed(turn):
                ep.finish = "malformed"
                return
        if out.fatal is not None:  # the official evaluation fails the sample here (a crop it cannot cut)
            ep.finish, ep.error = "error", out.fatal
            return
        self._append_result(ep, out, ended)
        if ep.finish is None and ep.turns >= self.limits.max_turns:  # last_call_runs: the call ran, now stop
            ep.finish = "max_turns"

    def _take_turn(self, ep: Episode, res: GenResult):
        """Record a generated turn; return (ended_with_eos, turn) when a tool result must follow."""
        if res.error is not None:
            ep.finish, ep.error = "error", res.error
            return None
        ep.versions.append((res.weight_version if res.weight_version is not None else self.engine.weight_version,
                            res.fingerprint))
        ended = True
        if self.engine.tokens:
            ep.ids += res.ids
            ep.mask += [1] * len(res.ids)
            ep.logprobs += [float(x) for x in res.logprobs]
            ep.used += len(res.ids)
            _, ended = strip_eos(res.ids, self.engine.special["im_end"])
        elif res.usage is not None:
            ep.used = res.usage  # chat engines: prompt and response are not told apart
        ep.messages.append({"role": "assistant", "content": res.text})
        ep.turns += 1
        turn = protocol.parse_turn(res.text, rule=self.prof.parse)
        if turn.fatal is not None:
            ep.finish, ep.error = "error", turn.fatal
        elif turn.answer is not None:
            ep.finish, ep.prediction = "answer", turn.answer
        elif res.finish == "length" and turn.call is None:
            ep.finish = "max_tokens"
        elif turn.call is None and turn.error is None:
            ep.finish = "no_action"
        elif ep.turns >= self.limits.max_turns and not (self.prof.last_call_runs and turn.call is not None):
            ep.finish = "max_turns"
        else:
            return ended, turn
        if self.on_turn is not None:
            self.on_turn(ep, turn, None)
        return None

    def _record_call(self, ep: Episode, turn: protocol.Turn, out: Outcome) -> None:
        ep.tool_calls.append({"turn": ep.turns, "name": turn.call.name, "arguments": turn.call.arguments,
                              "ok": out.ok, "error": out.error, "latency": round(out.latency, 6),
                              "infra": out.infra})
        if turn.extra_calls and not self.prof.official:
            # (the official loop runs the first call and says nothing of the others)
            _add_note(out.message, protocol.ignored_calls_note(turn.extra_calls))
        if self.on_turn is not None:
            self.on_turn(ep, turn, out)

    def _malformed(self, ep: Episode, turn: protocol.Turn) -> Outcome:
        raw = turn.raw_call if isinstance(turn.raw_call, dict) else {}
        name = raw.get("name") if isinstance(raw.get("name"), str) else None
        args = raw.get("arguments") if isinstance(raw.get("arguments"), dict) else None
        ep.tool_calls.append({"turn": ep.turns, "name": name, "arguments": args, "ok": False,
                              "error": turn.error, "latency": 0.0, "infra": False})
        out = Outcome(protocol.malformed_message(turn, ep.messages, profile=protocol.get_profile(self.profile).name),
                      False, turn.error, 0.0)
        if self.on_turn is not None:
            self.on_turn(ep, turn, out)
        return out

    # --- tool results --------------------------------------------------------------------

    def _cost(self, n_ids: int, images: list[str]) -> int:
        """Model-input tokens of `n_ids` ids holding `images` placeholders."""
        total = n_ids - len(images)
        for img in images:
            if img not in self._image_cost:
                self._image_cost[img] = int(self.engine.image_tokens(img))
            total += self._image_cost[img]
        return total

    def _cap_images(self, ep: Episode, message: dict) -> dict:
        """The tool message without its images when they would pass the engine's per-episode cap.

        The model is told in the message; the request that the server would refuse is never sent.
        """
        cap = self.engine.max_images
        new = [p for p in message.get("content") or [] if p.get("type") == "image"]
        have = len(ep.images) if self.engine.tokens else len(protocol.message_images(ep.messages))
        if cap is None or not new or have + len(new) <= cap:
            return message
        parts = [dict(p) for p in message["content"] if p.get("type") != "image"] or [{"type": "text", "text": ""}]
        parts[-1]["text"] = parts[-1].get("text", "") + (
            f"\n(Note: {len(new)} image{'s were' if len(new) != 1 else ' was'} left out: this conversation already "
            f"holds {have} of at most {cap} images. Answer with what you have, or use text search.)")
        if ep.tool_calls:
            ep.tool_calls[-1]["images_dropped"] = len(new)
        return {**message, "content": parts}

    def _append_result(self, ep: Episode, out: Outcome, ended: bool) -> None:
        """Add the tool message (and its template tokens) unless it would exceed the budget."""
        message = self._cap_images(ep, out.message)
        if self.engine.tokens:
            try:
                ids, mask, images = self.engine.renderer.continuation([message], ended_with_eos=ended)
                cost = self._cost(len(ids), images)
            except MarsError as e:  # a tool wrote an image the processor cannot read
                ep.finish, ep.error = "error", str(e)
                return
            if cost >= self._room(ep):
                ep.finish = "max_tokens"  # no room left to generate after this result
                return
            ep.ids += ids
            ep.mask += mask
            ep.logprobs += [0.0] * len(ids)
            ep.images += images
            ep.used += cost
        ep.messages.append(message)


def _add_note(message: dict, note: str) -> None:
    for part in message.get("content") or []:
        if part.get("type") == "text":
            part["text"] += note
            return
