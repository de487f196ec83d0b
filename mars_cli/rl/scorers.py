"""Rule scorers: answer normalization, exact match, substring, token F1, multiple choice.

Every scorer has one contract: `score(prediction, golds, choices) -> Score`, where the
prediction is the episode's extracted answer (a string), golds the task's answers (correct
if ANY gold matches) and choices the task's options (only `mcq` reads them).

Normalization is SQuAD's made Unicode-aware: NFKC (full-width `ＵＳＡ` is `USA`, `①` is
`1`), accents folded on Latin, Greek and Cyrillic letters (`Sōseki` is `Soseki`; kana
keep their voicing marks), case-folded, punctuation dropped (ASCII and every Unicode
punctuation character, e.g. `。「」`), the articles a/an/the dropped, whitespace collapsed.
Chinese and Japanese are written without spaces, so each Han or kana character is its own
token: `北京市` against `北京` is no exact match but an F1 of 0.8 and a substring hit,
where whole-string tokens would score 0 on all three. F1 is SQuAD's token F1
(bag-of-tokens overlap after normalization), taking the MAX over the golds.

An answer that is nothing but an article (`"A"`, an option letter) keeps it rather than
normalizing to nothing. A gold that still normalizes to nothing (`"."`, `"  "`) would match
any empty answer; such golds are ignored (`empty_golds` lists them so the judge can warn).

The multiple-choice letter cascade (`extract_choice`), first hit wins:
  1. `<answer>…</answer>` tag: the cascade runs on its content;
  2. `\\boxed{X}`: the content (a letter, or option text);
  3. the whole answer is a bare letter: `B`, `(B)`, `B.`, `B)`, `[B]`;
  4. a leading label: `B. the dog`, `(B) the dog`, `B: the dog`;
  5. a phrase: `answer is B`, `answer: (B)`, `option B`, `choice B`;
  6. bold: `**B**`;
  7. option text: the answer equals one option's text (normalized), or contains exactly one;
  8. the last standalone capital letter among the valid ones.
Valid letters are A–E, or the first len(choices) letters when choices are given.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Han (with extensions and compatibility ideographs), hiragana, katakana: one token each.
_CJK = re.compile("([\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                  "\U00020000-\U0002ebef\U00030000-\U0003134f])")
_FOLD_BELOW = 0x0530  # accents are folded on letters below Armenian: Latin, Greek, Cyrillic
# Letters with a stroke or ligatures that no decomposition reaches (Łódź, Ørsted, Æsir).
_LETTERS = str.maketrans({"ø": "o", "ł": "l", "đ": "d", "ð": "d", "ħ": "h", "ı": "i", "æ": "ae", "œ": "oe", "þ": "th"})
# Golds that are a bare yes/no must match exactly: containment would accept "no idea".
_POLAR = {"yes", "no", "true", "false"}
# Containment counts only for golds this short (tokens after normalization): a short
# entity inside a longer sentence is what "the answer is Paris." looks like.
SHORT_GOLD_TOKENS = 5


@dataclass
class Score:
    """A scorer's result: accuracy in [0, 1] and how it was reached."""

    accuracy: float
    method: str
    detail: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def _punct_table() -> dict:
    table = {i: None for i in range(0x10000) if unicodedata.category(chr(i)).startswith("P")}
    table.update({ord(c): None for c in string.punctuation})
    return table


def _fold_accents(text: str) -> str:
    out, latin = [], False
    for c in unicodedata.normalize("NFD", text):
        if unicodedata.combining(c):
            if latin:
                continue
        else:  # a mark after a space (one the Han split below put there) has no letter to fold
            latin = ord(c) < _FOLD_BELOW and not c.isspace()
        out.append(c)
    return unicodedata.normalize("NFC", "".join(out))


def _strip_punct(text: str) -> str:
    text = text.translate(_punct_table())
    return "".join(c for c in text if ord(c) < 0x10000 or not unicodedata.category(c).startswith("P"))


def normalize_answer(text: str) -> str:
    """SQuAD normalization, Unicode-aware: NFKC, accents folded, case-folded, no
    punctuation, no articles, Han/kana characters one token each, single spaces."""
    if not text.isascii():
        # Punctuation goes before accents are folded (a mark it leaves behind meets its new
        # base here, not in a second normalization) and after (folding "≠" leaves "="):
        # normalizing twice changes nothing.
        text = _fold_accents(_strip_punct(unicodedata.normalize("NFKC", text)))
        text = _strip_punct(text).casefold().translate(_LETTERS)
        text = _CJK.sub(r" \1 ", text)
    else:
        text = text.lower().translate(_punct_table())
    # An answer that is only an article ("A", an option letter; "The") keeps it: emptied,
    # it would equal every other empty answer.
    return " ".join(_ARTICLES.sub(" ", text).split()) or " ".join(text.split())


def empty_golds(golds: list[str]) -> list[str]:
    """Golds that normalize to nothing (punctuation, an article, blanks)."""
    return [g for g in golds if not normalize_answer(str(g))]


def _golds(golds: list[str]) -> list[str]:
    """Normalized golds, without the empty ones (they would match an empty answer)."""
    return [n for n in (normalize_answer(str(g)) for g in golds) if n]


def exact_match(prediction: str, golds: list[str]) -> bool:
    p = normalize_answer(prediction)
    return any(p == g for g in _golds(golds))


def _contains(haystack: str, needle: str) -> bool:
    # Word-bounded: "1" is not inside "10", "cat" not inside "concatenate".
    return bool(needle) and f" {needle} " in f" {haystack} "


def substring_match(prediction: str, golds: list[str]) -> bool:
    p = normalize_answer(prediction)
    return any(_contains(p, g) for g in _golds(golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    """SQuAD token F1 (Han/kana characters are tokens), the maximum over the golds."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for g in _golds(golds):
        gold = g.split()
        if not pred:
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def rule_judge(prediction: str, golds: list[str]) -> Score:
    """The offline stand-in for the LLM judge: em, then containment of a short gold."""
    if exact_match(prediction, golds):
        return Score(1.0, "em")
    p = normalize_answer(prediction)
    for g in golds:
        ng = normalize_answer(g)
        if not ng or ng in _POLAR or _words(ng) > SHORT_GOLD_TOKENS:
            continue
        if _contains(p, ng):
            return Score(1.0, "substring", {"gold": g})
    return Score(0.0, "em+substring")


def _words(normalized: str) -> float:
    """Length in words; a Han/kana character counts half (Chinese words run ~2 characters)."""
    return sum(0.5 if _CJK.fullmatch(t) else 1.0 for t in normalized.split())


# --- multiple choice ---------------------------------------------------------------

_LABEL = re.compile(r"^\s*[\(\[]?([A-Za-z])[\)\]\.:]?\s*$")
_LEADING = re.compile(r"^\s*[\(\[]?([A-Z])[\)\]\.:]\s+\S")
_PHRASE = re.compile(r"(?:answer\s*(?:is|:)|option|choice)\s*[:\-]?\s*[\(\[]?\**([A-Z])\b", re.IGNORECASE)
_BOLD = re.compile(r"\*\*\s*[\(\[]?([A-Z])[\)\]\.:]?\s*\*\*")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
_CHOICE_PREFIX = re.compile(r"^\s*[\(\[]?([A-Z])[\)\]\.:]\s*")


def _letters(choices: list[str] | None) -> str:
    n = len(choices) if choices else 5
    return string.ascii_uppercase[: max(1, min(n, 26))]


def choice_texts(choices: list[str] | None) -> list[str]:
    """Option texts with a leading `A.`/`(A)` label removed when it names its position."""
    out = []
    for i, c in enumerate(choices or []):
        m = _CHOICE_PREFIX.match(c)
        if m and m.group(1) == string.ascii_uppercase[i]:
            c = c[m.end():]
        out.append(c)
    return out


def _match_option_text(text: str, choices: list[str] | None) -> str | None:
    texts = [normalize_answer(t) for t in choice_texts(choices)]
    p = normalize_answer(text)
    if not p or not texts:
        return None
    for i, t in enumerate(texts):
        if t and p == t:
            return string.ascii_uppercase[i]
    hits = [i for i, t in enumerate(texts) if t and _contains(p, t)]
    # A longer option contains a shorter one ("red" in "dark red"): keep the longest.
    hits = [i for i in hits if not any(j != i and texts[i] != texts[j] and _contains(texts[j], texts[i]) for j in hits)]
    if len(hits) == 1:
        return string.ascii_uppercase[hits[0]]
    return None


def extract_choice(text: str, choices: list[str] | None = None) -> tuple[str | None, str]:
    """The option letter an answer names and the cascade step that found it."""
    valid = _letters(choices)
    m = _TAG.search(text)
    if m:
        letter, how = extract_choice(m.group(1), choices)
        return letter, f"tag+{how}" if letter else how
    m = _BOXED.search(text)
    if m:
        inner = m.group(1).strip()
        lm = _LABEL.match(inner)
        if lm and lm.group(1).upper() in valid:
            return lm.group(1).upper(), "boxed"
        letter = _match_option_text(inner, choices)
        if letter:
            return letter, "boxed+text"
    m = _LABEL.match(text)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper(), "letter"
    m = _LEADING.match(text)
    if m and m.group(1) in valid:
        return m.group(1), "label"
    for m in reversed(list(_PHRASE.finditer(text))):
        if m.group(1).upper() in valid:
            return m.group(1).upper(), "phrase"
    for m in reversed(list(_BOLD.finditer(text))):
        if m.group(1) in valid:
            return m.group(1), "bold"
    letter = _match_option_text(text, choices)
    if letter:
        return letter, "text"
    for m in reversed(list(_STANDALONE.finditer(text))):
        if m.group(1) in valid:
            return m.group(1), "last-letter"
    return None, "none"


def gold_letters(golds: list[str], choices: list[str] | None) -> set[str]:
    """The letters the golds name: a bare letter, a labelled option, or an option's text."""
    valid = _letters(choices)
    out = set()
    for g in golds:
        m = _LABEL.match(g) or _CHOICE_PREFIX.match(g)
        if m and m.group(1).upper() in valid:
            out.add(m.group(1).upper())
            continue
        letter = _match_option_text(g, choices) if choices else None
        if letter:
            out.add(letter)
    return out


def mcq_score(prediction: str, golds: list[str], choices: list[str] | None) -> Score:
    letter, how = extract_choice(prediction, choices)
    want = gold_letters(golds, choices)
    ok = letter is not None and letter in want
    if not want and letter is not None and choices:
        # Golds that name no option: compare the chosen option's text with them.
        ok = exact_match(choice_texts(choices)[string.ascii_uppercase.index(letter)], golds)
    return Score(float(ok), f"mcq:{how}", {"extracted": letter})


# One contract for every rule scorer: (prediction, golds, choices) -> Score.
RULE_SCORERS = {
    "em": lambda p, g, c: Score(float(exact_match(p, g)), "em"),
    "substring": lambda p, g, c: Score(float(substring_match(p, g)), "substring"),
    "f1": lambda p, g, c: Score(token_f1(p, g), "f1"),
    "mcq": mcq_score,
    "rule": lambda p, g, c: rule_judge(p, g),
}
