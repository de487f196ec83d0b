"""The released evaluation script's rules, as data and small pure functions.

The paper's scores come from `inference/eval.py` of OpenSenseNova/SenseNova-MARS, not from
the verl training loop, and the two differ. This module holds what eval.py does that the
training loop does not; the `sensenova-eval` protocol profile (protocol.PROFILES) points
the shared code (agent loop, toolbox, engines, judge) at it. Each rule names the line of
eval.py (at commit ce052d7) it follows; tests/test_sensenova_eval.py pins the official
function's outputs on small inputs.

- Parsing (parse_tool_call, 946): the FIRST `<tool_call>…</tool_call>` anywhere in the
  reply, thinking included, read as JSON; it needs the closing tag. A call wins over an
  answer written in the same reply (1474). A reply without a call ends the episode.
- The answer (extract_answer_allow_no_tag, 517): the last `<answer>…</answer>` after the
  last `</think>`/`</thinking>`, else the whole reply: an untagged reply is judged whole.
- Multiple choice (extract_mcq_answer, 383): a cascade over letters A–D on the final
  reply, first hit wins: the answer tag's content, then `\\boxed{}`, then "Answer: (X)",
  "answer is (X)", a bold "(X)", "(X)", "X)" / "X]", a standalone capital.
- Exact match (normalize_answer, 484): SQuAD's normalization on ASCII rules only (no
  Unicode folding): lower case, string.punctuation dropped, articles dropped unless the
  whole answer is "a", whitespace collapsed.
- Tool results (1483–1583): the error texts below, inside <tool_response> tags, no cut
  of long text; a zoom crops the full-resolution ORIGINAL (img_idx is ignored, `bbox` is
  accepted for `bbox_2d`, boxes are clamped) and resizes the crop (crop_image, 326).
- Limits (2246–2247, 1452): 50 turns, 4,096 tokens per turn, no prompt or response
  budget; the call of the last turn still runs.
- Images (1417–1427, 711): the first image of a task only, decoded as stored (no EXIF
  rotation, alpha dropped by convert("RGB")), resized by smart_resize (65,536–8,294,400
  pixels, factor 32, bicubic) and sent as PNG (image_to_base64, 315).
- Judge (llm_judge_score, 586): max_tokens 8192; a failed judge call stops the run (665).
"""

from __future__ import annotations

import re
import string
from typing import Any

UNKNOWN_TOOL = "Error: Unknown tool '{}'."  # eval.py:1582
INVALID_BBOX = "Error: Invalid bbox format."  # eval.py:1507
SEARCH_UNAVAILABLE = "Error: Search not available."  # eval.py:1531

MAX_TURNS = 50  # eval.py:2247
MAX_NEW_TOKENS = 4096  # eval.py:2246
JUDGE_MAX_TOKENS = 8192  # eval.py:653
MCQ_LETTERS = "ABCD"


def unknown_tool(name: Any) -> str:
    """eval.py formats the name as Python prints it, whatever JSON type it was (None, 5)."""
    return UNKNOWN_TOOL.format(name)


# --- the final reply ----------------------------------------------------------------

_ASSISTANT_HEAD = "<|im_start|>assistant"
_END_THINK = re.compile(r"</think(?:ing)?>")  # case-sensitive, as eval.py:390
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def final_reply(text: str) -> str:
    """The part of an output the scorers read: after the last assistant header and the
    last end-of-thinking tag (eval.py:389-390, 522-523)."""
    text = text.rsplit(_ASSISTANT_HEAD, 1)[-1]
    return _END_THINK.split(text)[-1]


def answer_text(text: str) -> str:
    """The answer of a final reply: the last answer tag's content, else the whole reply
    up to <|im_end|> (eval.py:517-529). Never None: an untagged reply is an answer."""
    if not text:
        return ""
    text = final_reply(text)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    return text.split("<|im_end|>")[0].strip()


def find_call(text: str) -> Any:
    """The JSON value inside the first closed <tool_call> of a reply, or None when there
    is none or it is not JSON (eval.py:946-955). Strict JSON (no NaN): records hold it."""
    from mars_cli.strictjson import loads_json

    m = _CALL.search(text)
    if m is None:
        return None
    try:
        return loads_json(m.group(1).strip())
    except ValueError:
        return None


# --- multiple choice ------------------------------------------------------------------

_ONE_LETTER = re.compile(r"^[A-Da-d]$")
_MARKED = re.compile(r"(?:\(([A-D])\)|\[([A-D])\]|(?<![A-Za-z])([A-D])[.\)\]])", re.IGNORECASE)
_STANDALONE = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")
_BOXED = re.compile(r"\\boxed\{([^}]+)\}", re.IGNORECASE)
_ANY_LETTER = re.compile(r"[A-Da-d]")
# The fallbacks on the whole reply, in order; each takes its last match (eval.py:431-461).
_ANSWER_PAREN = re.compile(r"Answer:\s*\(([A-D])\)", re.IGNORECASE)
_PHRASE = re.compile(r"(?:correct answer is|answer is)[:\s]*\(([A-D])\)", re.IGNORECASE)
_BOLD = re.compile(r"\*\*[^*]+\*\*")
_PAREN = re.compile(r"\(([A-D])\)", re.IGNORECASE)
_CLOSING = re.compile(r"(?<![A-Za-z])([A-D])[\)\]]", re.IGNORECASE)


def _letter_of(candidate: str) -> str | None:
    """A tag's or box's content → its letter: a lone letter, a marked one, a standalone one."""
    if _ONE_LETTER.match(candidate):
        return candidate.upper()
    marked = _MARKED.findall(candidate)
    if marked:
        return "".join(marked[-1]).upper()
    bare = _STANDALONE.findall(candidate)
    return bare[-1].upper() if bare else None


def choice_letter(text: str) -> str | None:
    """The option letter (A–D) eval.py reads from an output (extract_mcq_answer, 383)."""
    if not text:
        return None
    text = final_reply(text)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return _letter_of(tags[-1].strip())  # a tag decides, even when it names no letter
    boxed = _BOXED.search(text)
    if boxed and _ANY_LETTER.search(boxed.group(1)):
        return _letter_of(boxed.group(1).strip())  # likewise a box holding a-d anywhere
    for rx in (_ANSWER_PAREN, _PHRASE):
        found = rx.findall(text)
        if found:
            return found[-1].upper()
    for seg in reversed(_BOLD.findall(text)):
        m = _PAREN.search(seg)
        if m:
            return m.group(1).upper()
    for rx in (_PAREN, _CLOSING, _STANDALONE):
        found = rx.findall(text)
        if found:
            return found[-1].upper()
    return None


def choice_correct(letter: str | None, golds: list) -> bool:
    """check_answer (eval.py:466): the letter equals a gold, case-insensitively."""
    return letter is not None and any(letter.upper() == str(g).upper() for g in golds)


# --- exact match ------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """eval.py:484-501: lower, ASCII punctuation out, articles out (unless the whole text
    is "a"), whitespace collapsed. No Unicode folding: "Ｐａｒｉｓ" is not "paris"."""
    s = s.lower().translate(_PUNCT)
    if s.strip() != "a":
        s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str | None, golds) -> bool:
    """em_check (eval.py:504): the normalized prediction equals a normalized gold."""
    if prediction is None:
        return False
    if isinstance(golds, str):
        golds = [golds]
    p = normalize_answer(prediction)
    return any(normalize_answer(str(g)) == p for g in golds)


def final_output(record: dict) -> str:
    """The text eval.py scores for a trajectory: its last reply when the episode ended on a
    reply eval.py would not have gone on from, else nothing (a run cut at the turn limit ends
    on a tool result, eval.py:1586). A record rolled out under another profile (`mars judge
    --protocol sensenova-eval`) ended `no_action` or `max_tokens` on a reply that eval.py
    takes whole as the answer (eval.py:529), unless it holds a call eval.py would have run."""
    msgs = record.get("messages") or []
    finish = record.get("finish")
    if finish in ("max_turns", "error") or not msgs or msgs[-1].get("role") != "assistant":
        return ""
    c = msgs[-1].get("content")
    text = c if isinstance(c, str) else "".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
    if finish != "answer" and find_call(text) is not None:
        return ""
    return text
