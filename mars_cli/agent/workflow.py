"""How an episode starts, per workflow and protocol profile (`--workflow`, `--protocol`).

- `agent` (default): the profile's system prompt with the tool schemas; the model calls
  tools turn after turn until it answers (the paper's agentic workflow).
- `direct`: no tools. A system prompt that asks for reasoning and an `<answer>`, one turn.
- `rag`: `direct`, with the results of a text search for the question (and of an image
  search for the first image, when one is configured) placed before the question. The
  retrieval is recorded in the trajectory's `rag` field, not in `tool_calls`: the model
  did not choose it, so the format reward must not count it.
"""

from __future__ import annotations

import inspect

from mars_cli import protocol

WORKFLOWS = ("agent", "direct", "rag")

DIRECT_SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about images. Think about the question "
    "inside <thinking> and </thinking>, then give the final answer inside <answer> and </answer>: "
    "keep it short (a name, a number, a phrase, or an option letter)."
)
RAG_HEADER = "Retrieved information that may help (it may be incomplete or irrelevant):"


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def initial_messages(task: dict, *, workflow: str = "agent", profile: str | None = None,
                     system_prompt: str | None = None) -> list[dict]:
    """The conversation an episode starts from (before any retrieval)."""
    if workflow == "agent":
        kwargs = {"system_prompt": system_prompt}
        if profile is not None:
            if not _accepts(protocol.initial_messages, "profile"):
                if profile not in ("mars", "sensenova"):
                    from mars_cli.errors import UsageError

                    raise UsageError(f"unknown --protocol {profile!r}")
            else:
                kwargs["profile"] = profile
        return protocol.initial_messages(task, **kwargs)
    content: list[dict] = [{"type": "image", "image": str(p)} for p in task.get("images") or []]
    content.append({"type": "text", "text": protocol.question_text(task)})
    return [{"role": "system", "content": system_prompt or DIRECT_SYSTEM_PROMPT}, {"role": "user", "content": content}]


def check_episode_flags(*, workflow: str, on_malformed: str | None, protocol: str | None) -> None:
    """Refuse bad episode flags (UsageError) before any model loads."""
    from mars_cli.errors import UsageError

    if workflow not in WORKFLOWS:
        raise UsageError(f"--workflow must be one of {', '.join(WORKFLOWS)}, got {workflow!r}")
    if on_malformed is not None and on_malformed not in ("end", "observe"):
        raise UsageError(f"--on-malformed must be end or observe, got {on_malformed!r}")
    from mars_cli import protocol as proto  # the argument shadows the module's name here

    if protocol is not None and hasattr(proto, "get_profile"):
        proto.get_profile(protocol)


def default_on_malformed(profile: str | None) -> str:
    """The profile's own choice (`protocol.PROFILES`), else `observe` (tell the model, go on)."""
    profiles = getattr(protocol, "PROFILES", None)
    if profiles and profile in profiles:
        return getattr(profiles[profile], "on_malformed", "observe")
    if profiles and profile is None:
        for name in ("sensenova",):
            if name in profiles:
                return getattr(profiles[name], "on_malformed", "observe")
    return "observe"


def retrieve(toolbox, task: dict) -> tuple[str, dict]:
    """(text to put before the question, the record's `rag` field) for the rag workflow.

    Blocking (runs on a tool thread). A failed search is recorded and leaves its part out;
    the episode goes on without it, as a RAG baseline with a flaky backend would.
    """
    from mars_cli.errors import MarsError, ToolError

    parts: list[str] = []
    info: dict = {"query": task["question"], "text": None, "image": None}
    if toolbox.text_search is not None:
        from mars_cli.tools.text_search import render_text_results

        try:
            results = toolbox.text_search.search(task["question"], k=toolbox.k)
            parts.append(render_text_results(task["question"], results, budget_chars=toolbox.text_budget_chars))
            info["text"] = {"titles": [r.get("title") for r in results]}
        except (ToolError, MarsError, OSError) as e:
            info["text"] = {"error": str(e)}
    images = task.get("images") or []
    if toolbox.image_search is not None and images:
        from mars_cli.tools.image_search import render_image_results

        try:
            results = toolbox.image_search.search(str(images[0]), k=toolbox.image_k, task=task)
            text, _ = render_image_results(results)  # titles only: thumbnails would add images
            parts.append("\n".join(x for x in text.splitlines() if not x.startswith("Thumbnail ")))
            info["image"] = {"titles": [r.get("title") for r in results]}
        except (ToolError, MarsError, OSError) as e:
            info["image"] = {"error": str(e)}
    return ("\n\n".join([RAG_HEADER, *parts]) + "\n\n") if parts else "", info


def prepend_text(messages: list[dict], text: str) -> None:
    """Put `text` before the question of the first user message."""
    for part in messages[1]["content"]:
        if part.get("type") == "text":
            part["text"] = text + part["text"]
            return
