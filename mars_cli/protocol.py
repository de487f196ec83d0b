"""The agent protocol: prompt, tool schemas, parsing, answer extraction, chat rendering.

One owner for everything the model reads or writes, so rollout, SFT, judge and eval can
never disagree. Three profiles (`--protocol`), one turn format (Qwen-VL hermes-style calls).
A profile is data (`Profile`): the shared code (agent loop, toolbox, engines, judge) reads
its fields, it never asks for a profile by name.

- `sensenova` (the default): the released TRAINING loop (the verl fork's
  `tool_agent_loop` and `image_zoom_in_tool`), what the checkpoints learned from: the
  dataset's "#Role …" system prompt, a blank line, the official tools block
  (mars_cli/sensenova.py), the official tool schemas, verl's result strings and crop rule
  (the model's resized view), the 8,192-character cut of tool text; a malformed call ends
  the episode (`on_malformed="end"`), as it does there.
- `sensenova-eval`: the released EVALUATION script (`inference/eval.py`), where the
  paper's scores come from (mars_cli/sensenova_eval.py): same prompt and schemas, but a
  call wins over an answer and an untagged reply is the answer, zooms are cut from the
  full-resolution original, eval.py's error texts, 50 turns of 4,096 tokens without
  budgets, the first image only, resized to 65,536–8,294,400 pixels and sent as PNG,
  images decoded as stored, and eval.py's scoring (A–D cascade, ASCII exact match).
- `mars`: mars's own system prompt and schemas, crops cut from the full-resolution
  source, and a malformed call answered with an error the model can read
  (`on_malformed="observe"`).

Each assistant turn is

    <thinking>…</thinking>
    <tool_call>
    {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2], "label": "…"}}
    </tool_call>

or `<thinking>…</thinking>\n<answer>…</answer>`. Tool results come back as `role: "tool"`
messages, rendered (as Qwen's template does) inside a user turn in `<tool_response>` tags.

Parsing never raises: whatever the model wrote becomes a `Turn` with either one call, an
answer, an error the model can read, or nothing (no action).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from mars_cli import sensenova, sensenova_eval

ZOOM, TEXT_SEARCH, IMAGE_SEARCH = "image_zoom_in_tool", "text_search_tool", "image_search_tool"
TOOL_NAMES = (ZOOM, TEXT_SEARCH, IMAGE_SEARCH)
BBOX_SCALE = 1000  # bbox_2d is in 0–1000 relative units of the image it refers to
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # options are lettered; records allow at most 26

TOOL_SCHEMAS: list[dict] = [
    {
        "type": "function",
        "function": {
            "name": ZOOM,
            "description": "Zoom in on a region of an image of this conversation to see its details "
            "at full resolution. The region is a bounding box [x1, y1, x2, y2] in relative "
            "coordinates from 0 to 1000 (top-left origin) of the image chosen by img_idx.",
            "parameters": {
                "type": "object",
                "properties": {
                    "bbox_2d": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 4,
                        "maxItems": 4,
                        "description": "[x1, y1, x2, y2], 0–1000, x1 < x2 and y1 < y2",
                    },
                    "label": {"type": "string", "description": "what you expect to find in the region"},
                    "img_idx": {
                        "type": "integer",
                        "description": "index of the image among all images of the conversation "
                        "(0 = the first image of the question; zoomed images and thumbnails count too)",
                    },
                },
                "required": ["bbox_2d"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": TEXT_SEARCH,
            "description": "Search the web (or the local knowledge base) for text about a query. "
            "Returns a summary of the most relevant pages.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "a specific search query"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": IMAGE_SEARCH,
            "description": "Reverse image search: find pages showing an image of this conversation "
            "and return their titles and thumbnails. Use it to identify an unknown entity.",
            "parameters": {
                "type": "object",
                "properties": {
                    "img_idx": {"type": "integer", "description": "index of the image to search (default 0)"},
                },
                "required": [],
            },
        },
    },
]

MARS_SYSTEM_PROMPT = """You are a visual research agent. You answer questions about images, which may be very large, by reasoning step by step and using tools.

Each of your turns has two parts. First think inside <thinking> and </thinking>: what you know, what is missing, and what to do next. Then take exactly one action:
- call one tool: <tool_call>
{"name": <tool name>, "arguments": <arguments object>}
</tool_call>
- or give the final answer: <answer>your concise answer</answer>

Zoom in when a detail is too small to read, search images to identify what you see, and search text for facts you do not know. Tool results arrive in the next message. Answer as soon as you are confident; keep the final answer short (a name, a number, a phrase, or an option letter).

# Tools

You may call one of these functions per turn:
<tools>
{tools}
</tools>"""


SYSTEM_PROMPT = MARS_SYSTEM_PROMPT  # the mars profile's; the sensenova one is sensenova.SYSTEM_PROMPT


@dataclass(frozen=True)
class Profile:
    """A protocol profile: what the model is told and shown, how its turns are read, how
    its tools answer, the episode's default limits and how the judge scores it."""

    name: str
    on_malformed: str  # "end": the episode finishes `malformed` (reward 0); "observe": an error message
    tool_schemas: list
    crop: str  # "model-view": cut from the resized view; "source": full resolution (with provenance);
    #            "original": cut from the task's first image at full resolution, then resized
    summary: str
    official: bool = False  # the released system prompt, tools block and result strings
    parse: str = "one-action"  # "one-action": the first action wins; "call-first": eval.py's rule
    texts: dict = field(default_factory=dict)  # tool error texts: unknown_tool, search_unavailable, invalid_bbox
    tool_text_limit: int | None = None  # characters of tool text kept (the end), None: all
    limits: dict = field(default_factory=dict)  # defaults of the episode limits; flags win
    last_call_runs: bool = False  # at the turn limit the last call still runs
    pixels: tuple | None = None  # (min_pixels, max_pixels, factor) of the model's view; None: the checkpoint's
    send_images: str = "file"  # chat engines: "file" (the bytes as stored) or "view" (resized to pixels, PNG)
    task_images: int | None = None  # how many of a task's images the model gets (None: all)
    decode: str = "display"  # images.load_array's mode: "display" (EXIF, alpha on white) or "stored"
    needs_system_prompt: bool = False  # a task without a dataset system prompt is an error
    scoring: str = "mars"  # "mars": scorers.py on the prediction; "eval": sensenova_eval on the final reply
    judge: dict = field(default_factory=dict)  # LLM judge call: max_tokens, abort_on_failure


_VERL_TEXTS = {"unknown_tool": sensenova.UNKNOWN_TOOL, "search_unavailable": sensenova.SEARCH_UNAVAILABLE}
_EVAL_TEXTS = {"unknown_tool": sensenova_eval.UNKNOWN_TOOL, "search_unavailable": sensenova_eval.SEARCH_UNAVAILABLE,
               "invalid_bbox": sensenova_eval.INVALID_BBOX}

PROFILES: dict[str, Profile] = {
    "sensenova": Profile("sensenova", "end", sensenova.TOOL_SCHEMAS, "model-view",
                         "the released training loop (verl): its prompt, schemas, results and crop rule",
                         official=True, texts=_VERL_TEXTS, tool_text_limit=sensenova.TOOL_TEXT_LIMIT),
    "sensenova-eval": Profile(
        "sensenova-eval", "end", sensenova.TOOL_SCHEMAS, "original",
        "the released evaluation script (inference/eval.py), where the paper's scores come from",
        official=True, parse="call-first", texts=_EVAL_TEXTS,
        limits={"max_turns": sensenova_eval.MAX_TURNS, "max_new_tokens": sensenova_eval.MAX_NEW_TOKENS,
                "max_prompt_tokens": None, "max_response_tokens": None},
        last_call_runs=True, pixels=(sensenova.MIN_PIXELS, sensenova.MAX_PIXELS, 32), send_images="view",
        task_images=1, decode="stored", needs_system_prompt=True, scoring="eval",
        judge={"max_tokens": sensenova_eval.JUDGE_MAX_TOKENS, "abort_on_failure": True}),
    "mars": Profile("mars", "observe", TOOL_SCHEMAS, "source",
                    "mars's prompt; crops from the full-resolution source; malformed calls get an error message"),
}
DEFAULT_PROFILE = "sensenova"
ON_MALFORMED = ("end", "observe")


def get_profile(name: str | None) -> Profile:
    """The profile called `name` (None: the default); a UsageError names the choices."""
    from mars_cli.errors import UsageError

    name = name or DEFAULT_PROFILE
    if name not in PROFILES:
        raise UsageError(f"--protocol must be one of {', '.join(PROFILES)}, got {name!r}")
    return PROFILES[name]


def build_system_prompt(custom: str | None = None, *, profile: str = "mars") -> str:
    """The system prompt with the tools filled in.

    mars: mars's text (a custom text may place the schemas with {tools}). sensenova: the
    official rule: `custom` (or the official prompt), a blank line, the tools block.
    """
    if get_profile(profile).official:
        return sensenova.system_text(custom)
    text = MARS_SYSTEM_PROMPT if custom is None else custom
    tools = "\n".join(json.dumps(t, ensure_ascii=False) for t in TOOL_SCHEMAS)
    return text.replace("{tools}", tools)


def task_system_prompt(task: dict) -> str | None:
    """The dataset system prompt a task carries (converters keep the manifest's), if any."""
    for v in (task.get("system_prompt"), (task.get("meta") or {}).get("system_prompt")):
        if isinstance(v, str) and v:
            return v
    return None


def question_text(task: dict) -> str:
    """The user's text for a task: the question, and its options when it has any."""
    q = task["question"].strip()
    choices = task.get("choices")
    if choices:
        letters = CHOICE_LETTERS
        opts = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
        q = f"{q}\nOptions:\n{opts}\nAnswer with the option's letter."
    return q


def initial_messages(task: dict, *, profile: str = DEFAULT_PROFILE, system_prompt: str | None = None) -> list[dict]:
    """The conversation an episode starts from: system prompt, then images and question.

    `system_prompt` overrides the prompt text (official profiles: the dataset part, before
    the tools block); otherwise they use the task's own dataset prompt when it has one. A
    profile that needs one (sensenova-eval, as eval.py:1682) raises MarsError without it.
    """
    prof = get_profile(profile)
    if prof.official and system_prompt is None:
        system_prompt = task_system_prompt(task)
    if prof.needs_system_prompt and not system_prompt:
        from mars_cli.errors import MarsError

        raise MarsError(f"task {task.get('id')!r} has no dataset system prompt (system_prompt or meta.system_prompt): "
                        f"--protocol {prof.name} needs one, as the official evaluation does; give --system-prompt")
    images = list(task.get("images") or [])[: prof.task_images]
    content: list[dict] = [{"type": "image", "image": str(p)} for p in images]
    content.append({"type": "text", "text": question_text(task)})
    return [{"role": "system", "content": build_system_prompt(system_prompt, profile=prof.name)},
            {"role": "user", "content": content}]


# --- parsing -------------------------------------------------------------------------

@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class Turn:
    """What one assistant turn amounts to."""

    thinking: str | None = None
    call: ToolCall | None = None
    answer: str | None = None
    error: str | None = None  # a malformed call: tell the model, go on
    extra_calls: int = 0  # calls after the first, ignored
    raw_call: Any = field(default=None, repr=False)  # what was inside <tool_call>, for records
    fatal: str | None = None  # the reply stops the episode with an error (call-first: a call that is no object)

    @property
    def action(self) -> str:
        if self.answer is not None:
            return "answer"
        if self.call is not None:
            return "call"
        if self.error is not None:
            return "error"
        return "none"


# Tool-call JSON is read by the strict rules: only values a record can hold.
from mars_cli.strictjson import MAX_DEPTH as MAX_ARGUMENT_DEPTH, Unwritable, clean_text, loads_json  # noqa: E402,F401

_THINK_OPEN = re.compile(r"<think(?:ing)?>", re.IGNORECASE)
_THINK_END = re.compile(r"</think(?:ing)?>", re.IGNORECASE)
_THINK = re.compile(r"<think(?:ing)?>(.*?)(?:</think(?:ing)?>|$)", re.DOTALL | re.IGNORECASE)
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
# The innermost answer: its text may not contain another <answer> (nested tags give "A",
# not "<answer>A").
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)(?:</answer>|$)", re.DOTALL)


def _after_thinking(text: str) -> str:
    """The text where actions count: after the last end-of-thinking tag, and before a
    thinking block that is opened again and never closed (its text is still thinking)."""
    ends = list(_THINK_END.finditer(text))
    start = ends[-1].end() if ends else 0
    reopened = _THINK_OPEN.search(text, start)
    return text[start:reopened.start()] if reopened else text[start:]


def extract_answer(text: str) -> str | None:
    """The last <answer> of a turn, outside thinking; None when absent or empty."""
    found = _ANSWER.findall(_after_thinking(text))
    if not found:
        return None
    ans = found[-1].strip()
    return ans or None


def _loads_call(body: str) -> Any:
    body = body.strip()
    # Some models wrap the JSON in a code fence.
    if body.startswith("```"):
        body = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", body)
    return loads_json(body)


def validate_call(obj: Any) -> tuple[ToolCall | None, str | None]:
    """A parsed <tool_call> body → (call, None) or (None, message for the model)."""
    if not isinstance(obj, dict):
        return None, "the tool call must be a JSON object with \"name\" and \"arguments\""
    name = obj.get("name")
    if not isinstance(name, str):
        return None, "the tool call has no \"name\" string"
    if name not in TOOL_NAMES:
        return None, f"unknown tool {name!r}; the tools are {', '.join(TOOL_NAMES)}"
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some chat templates emit the arguments as a JSON string
        try:
            args = loads_json(args)
        except Unwritable as e:
            return None, f"the arguments of {name} cannot be used: {e}"
        except ValueError:
            return None, f"the arguments of {name} are not valid JSON"
    if not isinstance(args, dict):
        return None, f"the arguments of {name} must be a JSON object"
    problem = _check_arguments(name, args)
    if problem:
        return None, f"{name}: {problem}"
    return ToolCall(name, args), None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_arguments(name: str, args: dict) -> str | None:
    if "img_idx" in args and not (_is_int(args["img_idx"]) and args["img_idx"] >= 0):
        return "img_idx must be a non-negative integer"
    if name == ZOOM:
        box = args.get("bbox_2d")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            return "bbox_2d must be a list of four numbers [x1, y1, x2, y2]"
        x1, y1, x2, y2 = box
        if not all(0 <= v <= BBOX_SCALE for v in box):
            return f"bbox_2d values must be between 0 and {BBOX_SCALE}"
        if not (x1 < x2 and y1 < y2):
            return "bbox_2d must have x1 < x2 and y1 < y2"
        if "label" in args and not isinstance(args["label"], str):
            return "label must be a string"
    elif name == TEXT_SEARCH:
        q = args.get("query")
        if not isinstance(q, str) or not q.strip():
            return "query must be a non-empty string"
    return None


def parse_turn(text: str, *, rule: str = "one-action") -> Turn:
    """Read one assistant turn by a profile's `parse` rule. Never raises: any input gives a
    Turn (an error at worst)."""
    try:
        return _parse_call_first(text) if rule == "call-first" else _parse_turn(text)
    except Exception as e:  # a parser bug must not end a rollout: the model reads an error
        body = text if isinstance(text, str) else repr(text)
        return Turn(error=f"the turn could not be read ({type(e).__name__})", raw_call=clean_text(body[:2000]))


def _parse_call_first(text: str) -> Turn:
    """eval.py's reading (sensenova_eval): the first closed call anywhere, thinking
    included, wins; without one, the reply is the answer, tagged or not."""
    text = clean_text(text)
    turn = Turn()
    m = _THINK.search(text)
    if m:
        turn.thinking = m.group(1).strip() or None
    obj = sensenova_eval.find_call(text)
    if not obj:  # eval.py:1476 `if tool_call:` — none, unreadable JSON, {} or []: the reply ends the episode
        turn.answer = sensenova_eval.answer_text(text)
        return turn
    turn.raw_call = obj
    if not isinstance(obj, dict):  # eval.py:1477 calls .get on it: the sample fails
        turn.fatal = "the tool call is not a JSON object (the official evaluation fails such a sample)"
        return turn
    turn.call = ToolCall("{}".format(obj.get("name", "")), obj.get("arguments", {}))
    return turn


def _parse_turn(text: str) -> Turn:
    text = clean_text(text)
    turn = Turn()
    m = _THINK.search(text)
    if m:
        turn.thinking = m.group(1).strip() or None
    rest = _after_thinking(text)
    calls = list(_CALL.finditer(rest))
    answers = list(_ANSWER.finditer(rest))
    # One action per turn: whichever the model wrote first wins.
    first_call = calls[0].start() if calls else None
    first_answer = answers[0].start() if answers else None
    if first_answer is not None and (first_call is None or first_answer < first_call):
        turn.answer = extract_answer(text)
        if turn.answer is None:
            turn.error = "the answer is empty; write the answer inside <answer></answer>"
        return turn
    if not calls:
        return turn
    turn.extra_calls = len(calls) - 1
    body = calls[0].group(1)
    try:
        obj = _loads_call(body)
    except Unwritable as e:
        turn.raw_call = body.strip()
        turn.error = f"the tool call cannot be used: {e}"
        return turn
    except ValueError as e:
        turn.raw_call = body.strip()
        turn.error = f"the tool call is not valid JSON ({e.msg} at position {e.pos})" if isinstance(e, json.JSONDecodeError) else "the tool call is not valid JSON"
        return turn
    turn.raw_call = obj
    turn.call, turn.error = validate_call(obj)
    return turn


# --- writing the model's side (reference and teacher trajectories) --------------------

def format_call(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def format_assistant(thinking: str, *, call: tuple[str, dict] | None = None, answer: str | None = None) -> str:
    """An assistant turn in the protocol's format: thinking, then one call or the answer."""
    if (call is None) == (answer is None):
        raise ValueError("an assistant turn has exactly one action: a call or an answer")
    head = f"<thinking>{thinking.strip()}</thinking>\n"
    if call is not None:
        return head + format_call(*call)
    return head + f"<answer>{answer}</answer>"


# --- tool results ----------------------------------------------------------------------

ZOOM_HEADER = "Here is the zoomed image:"
IMAGE_SEARCH_HEADER = "Reverse Image Search Results:"
SUMMARY_HEADER = "Final summary generated for query: "


def tool_message(name: str | None, text: str, images: Iterable[str] = ()) -> dict:
    """A tool result: the text, then its images."""
    content = [{"type": "text", "text": text}]
    content.extend({"type": "image", "image": str(p)} for p in images)
    return {"role": "tool", "name": name, "content": content}


def tool_message_parts(name: str | None, parts: list[dict]) -> dict:
    """A tool result with text and images interleaved (image search: title, thumbnail, …)."""
    return {"role": "tool", "name": name, "content": parts}


def error_message(text: str, name: str | None = None) -> dict:
    """The tool message a malformed or failed call gets: the model reads it and goes on."""
    return tool_message(name, f"Error: {text}")


def is_malformed(turn: Turn) -> bool:
    """A turn whose action cannot be read at all: a call that is not a JSON object naming a
    tool, or an empty answer. The official loop ends the episode on these (it finds no call);
    a call to an unknown tool or with bad arguments gets an error result there instead.
    """
    if turn.error is None or turn.call is not None:
        return False
    if turn.answer is None and turn.raw_call is None:
        return True  # an empty <answer></answer>
    raw = turn.raw_call
    return not (isinstance(raw, dict) and isinstance(raw.get("name"), str))


def malformed_message(turn: Turn, messages: Sequence[dict], *, profile: str = DEFAULT_PROFILE) -> dict:
    """The tool message a call that could not run gets (the `observe` path).

    mars: mars's explanation. sensenova: the official tools' own error texts, so a
    released checkpoint reads what it was trained on.
    """
    raw = turn.raw_call if isinstance(turn.raw_call, dict) else {}
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    if get_profile(profile).official and name is not None:
        args = raw.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                return tool_message(name, f"Error: Invalid JSON in tool arguments: {e}")
        if name not in TOOL_NAMES:
            return tool_message(name, sensenova.unknown_tool(name))
        if name == ZOOM and isinstance(args, dict):
            text = sensenova.zoom_error(args, len(message_images(messages)))
            if text:
                return tool_message(name, text)
        if name == TEXT_SEARCH:
            return tool_message(name, "Error: query parameter is required and must be a string.")
    return error_message(turn.error or "the tool call could not be read", name)


def ignored_calls_note(n: int) -> str:
    return f"\n(Note: only the first tool call of a turn runs; {n} more call{'s were' if n > 1 else ' was'} ignored.)"


def message_images(messages: Sequence[dict]) -> list[str]:
    """Every image of the conversation in order: img_idx indexes this list."""
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            out.extend(p["image"] for p in c if p.get("type") == "image")
    return out


# --- rendering to tokens (mars_cli/rendering.py) --------------------------------------

from mars_cli.rendering import SPECIAL_NAMES, TEMPLATE_TAGS, Renderer, render, render_continuation  # noqa: E402,F401


def bbox_to_unit(bbox_2d: Sequence[float]) -> tuple[float, float, float, float]:
    """bbox_2d in 0–1000 units → a normalized [0, 1] box for the crop function."""
    x1, y1, x2, y2 = (float(v) / BBOX_SCALE for v in bbox_2d)
    return x1, y1, x2, y2
