"""The agent protocol: parsing never crashes, rendering and masks are exact."""

import json

from hypothesis import given, settings, strategies as st

from mars_cli import protocol as P


class ByteTokenizer:
    """A byte-level stand-in for a BPE tokenizer: one id per UTF-8 byte, ids ≥ 1000 special."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8")


SPECIAL = {"im_start": 1000, "im_end": 1001, "vision_start": 1002, "vision_end": 1003, "image_pad": 1004}


def call(name, args, thinking="look"):
    return P.format_assistant(thinking, call=(name, args))


def test_zoom_call_round_trip():
    t = P.parse_turn(call(P.ZOOM, {"bbox_2d": [10, 20, 300, 400], "label": "sign", "img_idx": 1}))
    assert t.action == "call" and t.thinking == "look"
    assert t.call.name == P.ZOOM and t.call.arguments["img_idx"] == 1
    assert P.bbox_to_unit(t.call.arguments["bbox_2d"]) == (0.01, 0.02, 0.3, 0.4)


def test_answer_after_think_end():
    text = "<think>maybe <answer>wrong</answer></think>\n<answer> Paris </answer>"
    assert P.extract_answer(text) == "Paris"
    assert P.parse_turn(text).answer == "Paris"


def test_last_answer_wins_and_empty_is_none():
    assert P.extract_answer("<answer>a</answer> then <answer>b</answer>") == "b"
    assert P.extract_answer("<answer>  </answer>") is None
    assert P.extract_answer("no tags") is None


def test_unterminated_answer_is_taken():
    assert P.extract_answer("<thinking>x</thinking><answer>42") == "42"


def test_first_action_wins():
    text = P.format_call(P.TEXT_SEARCH, {"query": "x"}) + "<answer>y</answer>"
    assert P.parse_turn(text).action == "call"
    text = "<answer>y</answer>" + P.format_call(P.TEXT_SEARCH, {"query": "x"})
    assert P.parse_turn(text).action == "answer"


def test_extra_calls_are_counted():
    text = P.format_call(P.TEXT_SEARCH, {"query": "a"}) + P.format_call(P.TEXT_SEARCH, {"query": "b"})
    t = P.parse_turn(text)
    assert t.call.arguments["query"] == "a" and t.extra_calls == 1


def test_errors_the_model_can_read():
    cases = {
        "<tool_call>{oops</tool_call>": "not valid JSON",
        '<tool_call>["x"]</tool_call>': "JSON object",
        '<tool_call>{"arguments": {}}</tool_call>': "no \"name\"",
        '<tool_call>{"name": "teleport", "arguments": {}}</tool_call>': "unknown tool",
        P.format_call(P.ZOOM, {"bbox_2d": [500, 0, 100, 10]}): "x1 < x2",
        P.format_call(P.ZOOM, {"bbox_2d": [0, 0, 1001, 10]}): "between 0 and 1000",
        P.format_call(P.ZOOM, {"bbox_2d": [0, 0, 10]}): "four numbers",
        P.format_call(P.TEXT_SEARCH, {"query": "  "}): "non-empty",
        P.format_call(P.IMAGE_SEARCH, {"img_idx": -1}): "non-negative",
    }
    for text, needle in cases.items():
        t = P.parse_turn(text)
        assert t.action == "error" and needle in t.error, (text, t)


def test_arguments_as_json_string_are_accepted():
    body = json.dumps({"name": P.TEXT_SEARCH, "arguments": json.dumps({"query": "q"})})
    assert P.parse_turn(f"<tool_call>{body}</tool_call>").call.arguments == {"query": "q"}


def test_no_action():
    assert P.parse_turn("I am thinking out loud").action == "none"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("<>/{}[]\":,ab 01\n") + ["<tool_call>", "</tool_call>", "<answer>", "</answer>", "<think>", "</thinking>", '"name"', '"arguments"', '"bbox_2d"', P.ZOOM]), max_size=40).map("".join))
def test_parse_never_raises(text):
    t = P.parse_turn(text)
    assert t.action in ("answer", "call", "error", "none")
    if t.call is not None:
        assert t.call.name in P.TOOL_NAMES


def test_initial_messages_put_images_first_and_list_options():
    msgs = P.initial_messages({"question": "Which?", "images": ["a.jpg", "b.jpg"], "choices": ["red", "blue"]})
    assert msgs[0]["role"] == "system" and P.ZOOM in msgs[0]["content"]
    parts = msgs[1]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert "A. red\nB. blue" in parts[2]["text"]
    assert P.message_images(msgs) == ["a.jpg", "b.jpg"]


def test_render_masks_only_assistant_content_and_its_end():
    tok = ByteTokenizer()
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image", "image": "i.jpg"}, {"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": "A"},
        P.tool_message(P.ZOOM, P.ZOOM_HEADER, ["c.jpg"]),
    ]
    ids, mask, images = P.render(msgs, tok, SPECIAL, add_generation_prompt=True)
    assert images == ["i.jpg", "c.jpg"]
    assert ids.count(SPECIAL["image_pad"]) == 2
    generated = [i for i, m in zip(ids, mask) if m]
    assert generated == [ord("A"), SPECIAL["im_end"]]
    text = "".join(chr(i) if i < 256 else f"[{i}]" for i in ids)
    assert text == (
        "[1000]system\nS[1001]\n"
        "[1000]user\n[1002][1004][1003]Q[1001]\n"
        "[1000]assistant\nA[1001]\n"
        "[1000]user\n<tool_response>\nHere is the zoomed image:[1002][1004][1003]\n</tool_response>[1001]\n"
        "[1000]assistant\n"
    )


def test_incremental_rendering_equals_whole_rendering():
    tok = ByteTokenizer()
    r = P.Renderer(tok, SPECIAL)
    start = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "Q"}]}]
    ids, mask, _ = r.render(start)
    turns = [("T1", P.error_message("bad")), ("T2", P.tool_message(P.TEXT_SEARCH, "res"))]
    msgs = list(start)
    for text, result in turns:
        gen = tok.encode(text) + [SPECIAL["im_end"]]  # what the policy generated
        ids += gen
        mask += [1] * len(gen)
        cont, cmask, _ = r.continuation([result])
        ids += cont
        mask += cmask
        msgs += [{"role": "assistant", "content": text}, result]
    whole, wmask, _ = r.render(msgs)
    assert ids == whole and mask == wmask


def test_continuation_adds_end_tag_when_generation_was_cut():
    tok = ByteTokenizer()
    ids, mask, _ = P.render_continuation([P.error_message("x")], tok, SPECIAL, ended_with_eos=False)
    assert ids[0] == SPECIAL["im_end"] and set(mask) == {0}
