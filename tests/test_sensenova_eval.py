"""The `sensenova-eval` profile's rules against the official evaluation script.

Every expected value below was produced by running the unmodified official function
(OpenSenseNova/SenseNova-MARS @ ce052d7, inference/eval.py, its network imports stubbed)
on the same small input; each test names the lines it follows. The official file is not
needed to run these tests.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mars_cli import images, protocol, sensenova, sensenova_eval
from mars_cli.agent.toolbox import EpisodeState, Toolbox
from mars_cli.records import make_task
from mars_cli.tools.crop_official import crop_original

EVAL = "sensenova-eval"


def photo(w: int, h: int) -> np.ndarray:
    """The test photo every pinned digest was computed on: channels (7x+3y, 5x+11y, x^y) mod 256."""
    x, y = np.arange(w, dtype=np.int64), np.arange(h, dtype=np.int64)[:, None]
    c0 = ((x * 7) % 256).astype(np.uint8)[None, :] + ((y * 3) % 256).astype(np.uint8)  # uint8 wraps: mod 256
    c1 = ((x * 5) % 256).astype(np.uint8)[None, :] + ((y * 11) % 256).astype(np.uint8)
    c2 = (x % 256).astype(np.uint8)[None, :] ^ (y % 256).astype(np.uint8)
    return np.ascontiguousarray(np.stack([c0, c1, c2], -1))


def digest(arr) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(arr)).tobytes()).hexdigest()[:16]


# --- multiple choice: inference/eval.py:383-463 (extract_mcq_answer) ---------------------

MCQ = [
    ("The answer is (A).", "A"), ("<answer>B</answer>", "B"), ("<answer>E</answer>", None),
    ("<answer>(c)</answer>", "C"), ("<answer>b</answer>", "B"),
    ("<thinking>maybe (A)</thinking><answer>The dog</answer>", None), ("<answer>A. red</answer><answer>D</answer>", "D"),
    ("\\boxed{C}", "C"), ("\\boxed{42}", None), ("\\boxed{x}", None), ("Answer: (D) because", "D"),
    ("answer is: (b)", "B"), ("**Option (C)** is right", "C"), ("I pick (B) not (A)", "A"), ("B) tall", "B"),
    ("E", None), ("Choice E.", None), ("a dog", None), ("I think it is D", "D"),
    ("<|im_start|>assistant\n(A)<|im_end|>", "A"), ("<think>(B)</think>C", "C"),
    ("<thinking>(B)</thinking>\n<answer>see above</answer>", None), ("", None), ("The answer is E.", None),
    ("<answer>\\boxed{B}</answer>", "B"), ("<answer>[d]</answer>", "D"), ("<ANSWER>C</ANSWER>", "C"),
    ("Final: A and B", "B"), ("xyz", None),
]


@pytest.mark.parametrize("text,want", MCQ)
def test_mcq_cascade_is_eval_pys(text, want):
    # inference/eval.py:383 extract_mcq_answer: letters A–D only, the whole final reply read
    assert sensenova_eval.choice_letter(text) == want


def test_mcq_differs_from_mars_cascade_where_eval_py_does():
    # eval.py:397-407 reads A–D on the full reply; mars's own cascade reads A–E in <answer>
    from mars_cli.rl.scorers import extract_choice

    assert extract_choice("E")[0] == "E" and sensenova_eval.choice_letter("E") is None
    assert extract_choice("The answer is (A).")[0] == "A" == sensenova_eval.choice_letter("The answer is (A).")
    # eval.py:466 check_answer: case-insensitive equality with a gold
    assert sensenova_eval.choice_correct("A", ["a"]) and not sensenova_eval.choice_correct(None, ["A"])


# --- exact match: inference/eval.py:484-514 (normalize_answer, em_check) ---------------------

EM = [("Ｐａｒｉｓ", "Paris", False, "ｐａｒｉｓ"), ("Sōseki", "Soseki", False, "sōseki"), ("A", "a", True, "a"),
      ("The Eiffel Tower", "eiffel tower", True, "eiffel tower"), ("a", "A.", True, "a"), ("An apple", "apple", True, "apple"),
      ("北京市", "北京", False, "北京市"), ("  the  ", "the", True, ""), ("U.S.A.", "usa", True, "usa"),
      ("“Paris”", "Paris", False, "“paris”"), ("café", "cafe", False, "café"), ("Paris!", ["London", "paris"], True, "paris")]


@pytest.mark.parametrize("pred,gold,match,norm", EM)
def test_exact_match_is_eval_pys_ascii_rule(pred, gold, match, norm):
    # eval.py:484 normalize_answer folds no Unicode: mars's own rule would match the first two
    assert sensenova_eval.normalize_answer(pred) == norm
    assert sensenova_eval.exact_match(pred, gold) is match


# --- the answer: inference/eval.py:517-529 (extract_answer_allow_no_tag) ---------------------

ANSWERS = [
    ("<answer> Paris </answer>", "Paris"), ("The answer is (A).", "The answer is (A)."),
    ("<thinking>x</thinking>It is Paris.<|im_end|>", "It is Paris."),
    ("<think>a</think>b<answer>c</answer><answer> d </answer>", "d"),
    ("x<|im_end|><|im_start|>user\n<tool_response>\nr\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
     "<thinking>t</thinking>final words<|im_end|>", "final words"),
    ("<THINKING>x</THINKING>y", "<THINKING>x</THINKING>y"), ("<answer>unclosed", "<answer>unclosed"), ("", ""),
    ("<thinking>only thinking</thinking>", ""),
]


@pytest.mark.parametrize("text,want", ANSWERS)
def test_untagged_reply_is_judged_whole(text, want):
    # eval.py:517: the last answer tag after thinking, else the whole reply
    assert sensenova_eval.answer_text(text) == want


# --- parsing: inference/eval.py:946-955 (parse_tool_call) and 1474-1476 -----------------------

def test_a_call_wins_over_an_answer_and_counts_inside_thinking():
    parse = lambda t: protocol.parse_turn(t, rule="call-first")  # noqa: E731
    t = parse('<answer>X</answer><tool_call>\n{"name": "c", "arguments": {"q": 1}}\n</tool_call>')
    assert t.call.name == "c" and t.call.arguments == {"q": 1} and t.answer is None  # eval.py:1475: call first
    t = parse('<thinking><tool_call>{"name":"a","arguments":{}}</tool_call></thinking>')
    assert t.call.name == "a"  # eval.py:948 searches the raw reply, thinking included
    # mars's own reading differs on both
    assert protocol.parse_turn('<answer>X</answer><tool_call>{"name": "c"}</tool_call>').answer == "X"
    assert protocol.parse_turn('<thinking><tool_call>{"name":"a"}</tool_call></thinking>').call is None


@pytest.mark.parametrize("text,answer", [
    ('<tool_call>{"name":"a"}', '<tool_call>{"name":"a"}'),  # eval.py:948 needs </tool_call>
    ('<tool_call>not json</tool_call><tool_call>{"name":"b"}</tool_call>', None),  # only the first is read
    ('<tool_call>```json\n{"name":"e"}\n```</tool_call>', None),  # no code-fence unwrapping
    ('<TOOL_CALL>{"name":"f"}</TOOL_CALL>', None),  # case-sensitive tags
    ("<tool_call>{}</tool_call>", None),  # eval.py:1476 `if tool_call:`: an empty object is no call
])
def test_no_readable_call_ends_the_episode_with_the_reply_as_answer(text, answer):
    t = protocol.parse_turn(text, rule="call-first")
    assert t.call is None and t.fatal is None
    assert t.answer == (answer if answer is not None else sensenova_eval.answer_text(text))


def test_a_call_that_is_no_object_fails_the_sample():
    # eval.py:1477 calls .get on it: AttributeError, caught at 1740 as a sample error
    t = protocol.parse_turn('<tool_call>["x"]</tool_call>', rule="call-first")
    assert t.fatal and t.call is None and t.answer is None


def test_unknown_tool_name_is_formatted_as_python_prints_it():
    # eval.py:1477 tool_call.get("name", ""), 1582 f"...'{tool_name}'."
    assert protocol.parse_turn('<tool_call>{"arguments": {}}</tool_call>', rule="call-first").call.name == ""
    assert protocol.parse_turn('<tool_call>{"name": null}</tool_call>', rule="call-first").call.name == "None"
    assert sensenova_eval.unknown_tool("x_tool") == "Error: Unknown tool 'x_tool'."


# --- images: inference/eval.py:245-323, 326-376, 1417-1427 ------------------------------------

def test_smart_resize_of_the_8k_photo():
    # eval.py:245 smart_resize(5241, 8064) with the defaults 65,536-8,294,400, factor 32
    assert sensenova.smart_resize(5241, 8064) == (2304, 3552)


CROPS = [  # eval.py:326 crop_image on photo(2000, 1300): size and pixel digest
    ([100, 200, 300, 400], (384, 256), "cfe0ccc55322458f"),
    ([-50, -50, 1200, 500], (1984, 640), "1027d847768ee986"),  # eval.py:348-349 clamps
    ([0, 0, 2, 2], (256, 256), "8051ce3011594ccb"),  # eval.py:369-370 stretched to 28, then grown
    ([500, 500, 500, 500], (256, 256), "3381de4ca9f3a477"),  # no area: an empty crop, stretched
    ([900, 900, 1200, 1200], (320, 224), "e15297fafedcf007"),
    ([10.5, 20.25, 30.75, 60.5], (224, 320), "357f6f834e810ece"),
    ("1234", (256, 256), "897131a20cf7dd9e"),  # eval.py:345 iterates any 4-long value
]


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "photo.png"
    Image.fromarray(photo(2000, 1300)).save(path, compress_level=1)
    return str(path)


@pytest.mark.parametrize("box,size,want", CROPS)
def test_crop_original_is_eval_pys_crop(tmp_path, photo_file, box, size, want):
    res = crop_original(photo_file, box, out_dir=tmp_path)
    out = Image.open(res["path"])
    assert out.size == size and out.format == "PNG" and digest(out.convert("RGB")) == want


@pytest.mark.parametrize("box", [[300, 400, 100, 200], [1200, 0, 1300, 100]])
def test_inverted_box_raises_as_eval_py_does(tmp_path, photo_file, box):
    # eval.py:364 image.crop raises ValueError ("Coordinate 'right' is less than 'left'")
    with pytest.raises(ValueError):
        crop_original(photo_file, box, out_dir=tmp_path)


def test_the_view_sent_is_eval_pys_process_image(photo_file):
    # eval.py:1424-1427 process_image + image_to_base64 (PNG): photo(2000, 1300) → 1984×1312
    from mars_cli.engines.openai_engine import view_png
    import io

    im = Image.open(io.BytesIO(view_png(photo_file, 65536, 8294400, 32)))
    assert im.format == "PNG" and im.size == (1984, 1312) and digest(im.convert("RGB")) == "8771b4eed69b7963"


def test_images_are_decoded_as_stored(tmp_path):
    # eval.py:1418-1421: Image.open, no EXIF rotation, convert("RGB") drops alpha
    a = np.zeros((200, 300, 4), np.uint8)
    a[:, :150] = (255, 0, 0, 0)
    a[:, 150:] = (0, 0, 255, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    stored = images.load_array(tmp_path / "rgba.png", decode="stored")
    assert tuple(stored[10, 10]) == (255, 0, 0)  # official: (255, 0, 0); mars's display mode composites on white
    assert tuple(images.load_array(tmp_path / "rgba.png")[10, 10]) == (255, 255, 255)
    b = np.zeros((200, 300, 3), np.uint8)
    b[:, :100] = (250, 10, 10)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(b).save(tmp_path / "exif6.jpg", exif=exif, quality=95)
    assert images.load_array(tmp_path / "exif6.jpg", decode="stored").shape[:2] == (200, 300)  # official view 320×224
    assert images.load_array(tmp_path / "exif6.jpg").shape[:2] == (300, 200)
    assert images.image_size(tmp_path / "exif6.jpg", decode="stored") == (300, 200)


# --- tool results: inference/eval.py:1483-1583 --------------------------------------------------

@pytest.fixture
def eval_conv(tmp_path, photo_file):
    task = make_task("t", "q", images=[photo_file, photo_file], meta={"system_prompt": "S"})
    box = Toolbox(tmp_path / "art", profile=EVAL)
    return box, protocol.initial_messages(task, profile=EVAL), EpisodeState(task=task)



def test_tool_error_texts_are_eval_pys(eval_conv):
    box, messages, state = eval_conv
    out = box.run(protocol.ToolCall("x_tool", {}), messages, state)
    assert out.message["content"][0]["text"] == "Error: Unknown tool 'x_tool'."  # eval.py:1582
    out = box.run(protocol.ToolCall(protocol.ZOOM, {"bbox_2d": [1, 2, 3]}), messages, state)
    assert out.message["content"][0]["text"] == "Error: Invalid bbox format."  # eval.py:1484-1507
    out = box.run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "q"}), messages, state)
    assert out.message["content"][0]["text"] == "Error: Search not available."  # eval.py:1514-1531


def test_zoom_ignores_img_idx_accepts_bbox_and_fails_an_inverted_box(eval_conv):
    box, messages, state = eval_conv
    # eval.py:1484 `bbox_2d` or `bbox`; 1486 always the original, whatever img_idx says
    out = box.run(protocol.ToolCall(protocol.ZOOM, {"bbox": [100, 200, 300, 400], "img_idx": 7}), messages, state)
    assert out.ok and out.fatal is None
    crop = Image.open(out.message["content"][1]["image"])
    assert crop.size == (384, 256) and digest(crop.convert("RGB")) == "cfe0ccc55322458f"
    out = box.run(protocol.ToolCall(protocol.ZOOM, {"bbox_2d": [300, 400, 100, 200]}), messages, state)
    assert out.fatal and "cannot be cut" in out.fatal  # eval.py:364 raises: the sample fails (1740)


def test_long_tool_text_is_not_cut(eval_conv):
    # eval.py:1528 sends the whole search result; the training loop keeps the last 8,192 characters
    class Summarized:
        def search(self, query, k=5):
            return [{"title": "t", "text": "x", "query_summary": "word " * 5000}]

    box, messages, state = eval_conv
    box.text_search = Summarized()
    out = box.run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "word"}), messages, state)
    text = out.message["content"][0]["text"]
    assert out.ok and text == "Final summary generated for query: word\n" + "word " * 5000  # eval.py:1316
    sensenova_box = Toolbox(box.artifacts, profile="sensenova", text_search=Summarized())
    cut = sensenova_box.run(protocol.ToolCall(protocol.TEXT_SEARCH, {"query": "word"}), messages, state)
    assert len(cut.message["content"][0]["text"]) == sensenova.TOOL_TEXT_LIMIT + len(sensenova.TRUNCATED_MARK)


def test_first_image_only_and_the_system_prompt_is_required():
    task = make_task("t", "q", images=["a.png", "b.png"], meta={"system_prompt": "S"})
    msgs = protocol.initial_messages(task, profile=EVAL)
    assert protocol.message_images(msgs) == ["a.png"]  # eval.py:711 images[0]
    assert msgs[0]["content"].startswith("S\n\n# Tools\n")  # eval.py:1687 system + "\n\n" + tools
    from mars_cli.errors import MarsError

    with pytest.raises(MarsError, match="no dataset system prompt"):  # eval.py:1682-1683
        protocol.initial_messages(make_task("t", "q", images=["a.png"]), profile=EVAL)


def test_profile_limits_are_eval_pys():
    # eval.py:2246 --max-tokens 4096, 2247 --max-turns 50; no prompt or response budget
    prof = protocol.get_profile(EVAL)
    assert prof.limits == {"max_turns": 50, "max_new_tokens": 4096, "max_prompt_tokens": None, "max_response_tokens": None}
    assert prof.last_call_runs and prof.pixels == (65536, 8294400, 32) and prof.tool_text_limit is None
    assert prof.judge == {"max_tokens": 8192, "abort_on_failure": True}  # eval.py:653, 665
    assert protocol.get_profile("sensenova").tool_text_limit == 8192  # the training loop's cut stays there


_PIECES = ["<tool_call>", "</tool_call>", "<answer>", "</answer>", "<thinking>", "</thinking>", "</think>",
           '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}}', "[1]", "{}", "(A)", "B)", " ",
           "\n", "x", "<|im_end|>", "<|im_start|>assistant\n"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join))
def test_call_first_reading_is_total_and_exclusive(text):
    # eval.py:1474-1598: each reply is either a call that runs, a failed sample, or the final answer
    t = protocol.parse_turn(text, rule="call-first")
    assert [t.call is not None, t.fatal is not None, t.answer is not None].count(True) == 1
    if t.answer is not None:
        assert t.answer == sensenova_eval.answer_text(text)
    sensenova_eval.choice_letter(text)  # never raises
