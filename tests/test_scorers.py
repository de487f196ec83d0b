"""Rule scorers: SQuAD normalization, em, substring, F1, the MCQ cascade, the rule judge."""

import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mars_cli.rl import scorers
from mars_cli.rl.scorers import extract_choice, mcq_score, normalize_answer, rule_judge, token_f1


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a  cat,  an owl and THE dog. ", "cat owl and dog"),
        ("U.S.A.", "usa"),
        ("theatre", "theatre"),  # articles only as whole words
        ("", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_any_gold():
    assert scorers.exact_match("the Louvre.", ["Musée d'Orsay", "Louvre"])
    assert not scorers.exact_match("Louvre museum", ["Louvre"])


def test_substring_is_word_bounded():
    assert scorers.substring_match("It is in Paris, France.", ["paris"])
    assert not scorers.substring_match("10 apples", ["1"])
    assert not scorers.substring_match("concatenate", ["cat"])


def test_token_f1_hand_computed():
    # pred tokens: [red, car, parked]; gold: [red, car] -> p = 2/3, r = 1, f1 = 0.8
    assert token_f1("The red car parked", ["a red car"]) == pytest.approx(0.8)
    # max over golds
    assert token_f1("red car", ["blue bus", "red car"]) == 1.0
    assert token_f1("green", ["red car"]) == 0.0
    # repeated tokens count by multiplicity: pred [a1 a1 b] vs gold [a1 b b] -> common 2
    assert token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "text, letter, how",
    [
        ("<answer>C</answer>", "C", "tag+letter"),
        ("so \\boxed{D}", "D", "boxed"),
        ("\\boxed{blue whale}", "B", "boxed+text"),
        ("B", "B", "letter"),
        ("(b)", "B", "letter"),
        ("C.", "C", "letter"),
        ("A. red fox", "A", "label"),
        ("(D) grey seal", "D", "label"),
        ("After looking closely, the answer is (C) because of the fin", "C", "phrase"),
        ("Answer: b", "B", "phrase"),
        ("I pick option E", "E", "phrase"),
        ("My final choice is **D**", "D", "bold"),
        ("it is a blue whale", "B", "text"),
        ("Between them, C", "C", "last-letter"),
        ("no idea", None, "none"),
    ],
)
def test_extract_choice_cascade(text, letter, how):
    choices = ["A. red fox", "B. blue whale", "C. orca", "D. grey seal", "E. otter"]
    assert extract_choice(text, choices) == (letter, how)


def test_extract_choice_respects_number_of_choices():
    assert extract_choice("E", ["x", "y"]) == (None, "none")
    assert extract_choice("D", None) == ("D", "letter")


def test_option_text_prefers_the_longest_option():
    assert extract_choice("dark red", ["red", "dark red", "blue"]) == ("B", "text")


def test_mcq_gold_as_letter_or_text():
    choices = ["cat", "dog", "owl"]
    assert mcq_score("(B)", ["B"], choices).accuracy == 1.0
    assert mcq_score("B", ["dog"], choices).accuracy == 1.0
    assert mcq_score("the dog", ["B. dog"], choices).accuracy == 1.0
    assert mcq_score("C", ["B"], choices).accuracy == 0.0
    s = mcq_score("nothing", ["B"], choices)
    assert s.accuracy == 0.0 and s.detail["extracted"] is None


def test_rule_judge_fallback():
    assert rule_judge("Paris", ["paris"]).method == "em"
    s = rule_judge("The photo was taken in Paris.", ["Paris"])
    assert (s.accuracy, s.method) == (1.0, "substring")
    # yes/no golds must match exactly: containment would accept hedges
    assert rule_judge("no idea, maybe yes", ["no"]).accuracy == 0.0
    # long golds are not looked for inside predictions
    long_gold = "the tallest building in the old town square"
    assert rule_judge(f"I think {long_gold} here", [long_gold]).accuracy == 0.0


@settings(max_examples=200, deadline=None)
@given(st.text())
@example("\U00020000\U0001e000")  # a mark the Han split leaves after a space
@example("a\u3002\u0301")  # a mark the punctuation's removal leaves on a letter
@example("\u2260")  # "≠" folds to "=", punctuation
def test_normalize_is_idempotent(s):
    n = normalize_answer(s)
    assert normalize_answer(n) == n


@settings(max_examples=200, deadline=None)
@given(st.text(), st.lists(st.text(), min_size=1, max_size=3))
def test_f1_bounds_and_em_implies_full_f1(pred, golds):
    f = token_f1(pred, golds)
    assert 0.0 <= f <= 1.0
    if scorers.exact_match(pred, golds):
        assert f == 1.0


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.text(max_size=10), max_size=6))
def test_extract_choice_total(text, choices):
    letter, how = extract_choice(text, choices or None)
    valid = string.ascii_uppercase[: len(choices) if choices else 5]
    assert letter is None or letter in valid
    assert isinstance(how, str)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from("ABCDE"), st.sampled_from(["{}", "({})", "{}.", "**{}**", "\\boxed{{{}}}", "The answer is {}"]))
def test_every_letter_format_round_trips(letter, fmt):
    assert extract_choice(fmt.format(letter))[0] == letter
