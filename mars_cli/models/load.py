"""Load a Qwen-VL policy directory: model, tokenizer, image processor, special ids.

The stock Qwen-VL `*Processor` classes need torchvision (not installable here and not
needed), so the tokenizer and the PIL image processor are loaded on their own. The same
code path serves a tiny local model and a released Qwen2.5-VL-7B / Qwen3-VL-8B directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mars_cli.errors import MarsError
from mars_cli.fsutil import read_json_object, recover_dir

# config.json model_type → (our arch name, transformers class name)
ARCHITECTURES = {
    "qwen2_vl": ("qwen2-vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("qwen3-vl", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("qwen3-vl-moe", "Qwen3VLMoeForConditionalGeneration"),
}
SPECIAL_TOKENS = {
    "im_start": "<|im_start|>", "im_end": "<|im_end|>", "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>", "image_pad": "<|image_pad|>", "eos": "<|im_end|>", "pad": "<|endoftext|>",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass
class Policy:
    """A loaded policy: the model and everything needed to build its inputs."""

    model: Any
    tokenizer: Any
    image_processor: Any
    arch: str
    path: str
    fingerprint: str
    special: dict = field(default_factory=dict)
    end_ids: list = field(default_factory=list)  # the checkpoint's own end-of-sequence ids (end_ids)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    @property
    def device(self):
        return next(self.model.parameters()).device


def _short_hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weights files of a checkpoint directory, sorted by name."""
    return sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                  and not p.name.startswith(".") and p.name not in ("training_args.bin", "optimizer.pt"))


def resolve_policy(path: str | Path) -> Path:
    """A model directory: the path itself, or a Hub name (ORG/NAME) from the local HF cache."""
    from mars_cli.hub import resolve_model

    return resolve_model(path)


def model_dir(path: str | Path) -> Path:
    """`path` (or the Hub name's cached snapshot) checked to be a directory, after finishing
    an interrupted replacement of it."""
    path = resolve_policy(path)
    recover_dir(path)
    if not path.exists():
        raise MarsError(f"{path}: no such model directory")
    if not path.is_dir():
        raise MarsError(f"{path}: not a directory (expected a model checkpoint directory)")
    return path


def read_config(path: str | Path) -> dict:
    """config.json of a model directory, with clear errors for what is not one."""
    path = model_dir(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise MarsError(f"{path}: not a model directory (no config.json)")
    return read_json_object(cfg_path)


def arch_of(cfg: dict, where: str | Path = "config.json") -> str:
    """Our arch name for a config, or a MarsError naming the supported ones."""
    mt = cfg.get("model_type")
    if mt not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise MarsError(f"{where}: unsupported model_type {mt!r} (supported: {supported})")
    return ARCHITECTURES[mt][0]


def fingerprint(path: str | Path) -> str:
    """A short id of a checkpoint's config and weights, cheap for multi-GB directories.

    The content fingerprint recorded in mars_model.json is used while config.json is
    unchanged and the weights files still have the sizes and mtimes it recorded; otherwise the id hashes config.json and
    each weights file's name, size and mtime (a copy without -p gets a new id: safe side).
    """
    path = resolve_policy(path)
    read_config(path)  # validates the directory
    config = (path / "config.json").read_bytes()
    files = weight_files(path)
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    meta_path = path / "mars_model.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        if (isinstance(meta, dict) and meta.get("files") == stats and isinstance(meta.get("fingerprint"), str)
                and meta.get("config_sha256") == hashlib.sha256(config).hexdigest()):
            return meta["fingerprint"]
    return _short_hash(config, json.dumps(stats, sort_keys=True).encode())


def quiet_transformers() -> None:
    """No transformers progress bars ("Loading weights") on stderr unless -v."""
    from mars_cli import streams

    if streams.verbosity < 1:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's "Setting accelerator to CPU" warning off stderr unless -v.

    DeepSpeed prints it while importing whenever it finds no GPU. Naming the CPU
    accelerator up front (DS_ACCELERATOR=cpu, as a user could) is the same choice made
    without the warning. Call before the first `import deepspeed`; a GPU, Apple's MPS
    or a DS_ACCELERATOR the user set are left alone.
    """
    import os

    from mars_cli import streams

    if streams.verbosity >= 1 or "DS_ACCELERATOR" in os.environ:
        return
    import torch

    mps = getattr(torch.backends, "mps", None)
    if not torch.cuda.is_available() and not (mps is not None and mps.is_available()):
        os.environ["DS_ACCELERATOR"] = "cpu"


def _dtype(dtype, device: str):
    import torch

    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise MarsError(f"unknown dtype {dtype!r} (expected float32, bfloat16 or float16)") from None
    return dtype


# --attn-implementation choices. sdpa (torch's fused attention) is the default and runs
# anywhere; flash_attention_2 needs the flash-attn package and a CUDA GPU, and skips the
# padded positions of a batch; eager is the reference implementation.
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")


def check_attn_implementation(name: str | None, *, device: str = "cpu", dtype=None) -> None:
    """Refuse an attention implementation this machine cannot run, before any weights load."""
    if name is None:
        return
    from mars_cli.errors import UsageError

    if name not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name == "flash_attention_2":
        import importlib.util

        import torch

        if importlib.util.find_spec("flash_attn") is None:
            raise MarsError("--attn-implementation flash_attention_2 needs the flash-attn package "
                            "(pip install flash-attn --no-build-isolation, on a machine with CUDA); "
                            "use sdpa without it")
        if not str(device).startswith("cuda"):
            raise MarsError(f"--attn-implementation flash_attention_2 runs on CUDA GPUs only, not on {device}")
        if _dtype(dtype, device) == torch.float32:
            raise MarsError("--attn-implementation flash_attention_2 needs bfloat16 or float16 weights, not float32")


_TOKENIZERS: dict[tuple, Any] = {}


def load_tokenizer(path: str | Path):
    """The fast tokenizer of a model directory (shared per process: do not mutate it).

    Loading a 151k-token BPE costs seconds, and a process (a test session, an update that
    reloads its policy) asks for the same tokenizer many times, so loaded tokenizers are
    kept, keyed on the files' sizes and mtimes.
    """
    from transformers import AutoTokenizer

    path = model_dir(path)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise MarsError(f"{path}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    key = (str(path.resolve()),) + tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir())
        if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template")))
    tok = _TOKENIZERS.get(key)
    if tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise MarsError(f"{path}: cannot load tokenizer: {e}") from None
        if len(_TOKENIZERS) >= 8:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = tok
    return tok


def load_image_processor(path: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None):
    """Qwen2VLImageProcessorPil from preprocessor_config.json (no torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = model_dir(path)
    cfg_path = path / "preprocessor_config.json"
    if not cfg_path.is_file():
        raise MarsError(f"{path}: no preprocessor_config.json (the image processor settings)")
    cfg = read_json_object(cfg_path)
    # Released configs name the torchvision-backed "Fast" class; the PIL class reads the
    # same fields, so build it from the dict rather than through the Auto class.
    cfg = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
    size = dict(cfg.pop("size", None) or {})
    lo = cfg.pop("min_pixels", None)
    hi = cfg.pop("max_pixels", None)
    size.setdefault("shortest_edge", lo if lo is not None else 56 * 56)
    size.setdefault("longest_edge", hi if hi is not None else 28 * 28 * 1280)
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    allowed = {"do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
               "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size"}
    return Qwen2VLImageProcessorPil(size=size, **{k: v for k, v in cfg.items() if k in allowed})


def special_ids(tokenizer, where: str | Path = "") -> dict[str, int]:
    """The ids of the chat and vision special tokens, checked to exist."""
    out = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name, text in SPECIAL_TOKENS.items():
        tid = tokenizer.convert_tokens_to_ids(text)
        if tid is None or (unk is not None and tid == unk and text != tokenizer.unk_token):
            raise MarsError(f"{where}: tokenizer has no {text} token (not a Qwen-VL tokenizer?)")
        out[name] = int(tid)
    return out


def end_ids(path: str | Path) -> list[int]:
    """The checkpoint's own end-of-sequence ids: config.json's (and its text config's) and
    generation_config.json's `eos_token_id`, each an id or a list. vLLM and sglang end a reply
    at any of them whatever the request's stop ids say (Qwen-VL's generation config lists
    <|im_end|> and <|endoftext|>), and so does transformers' generate by default."""
    out: list[int] = []
    for name in ("config.json", "generation_config.json"):
        try:
            cfg = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
        for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
            v = c.get("eos_token_id") if isinstance(c, dict) else None
            for t in (v if isinstance(v, list) else [v]):
                if isinstance(t, int) and not isinstance(t, bool) and t >= 0 and t not in out:
                    out.append(t)
    return out


def context_length(model) -> int | None:
    """The model's context length (its text config's max_position_embeddings), or None."""
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        n = getattr(c, "max_position_embeddings", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def load_policy(path, *, device: str = "cpu", dtype=None, trainable: bool = False,
                min_pixels: int | None = None, max_pixels: int | None = None,
                attn_implementation: str | None = None) -> Policy:
    """Load a Qwen-VL checkpoint directory as a Policy (eval mode unless trainable)."""
    import transformers

    quiet_transformers()
    quiet_deepspeed()  # transformers imports DeepSpeed when it is installed
    check_attn_implementation(attn_implementation, device=device, dtype=dtype)
    path = model_dir(path)
    cfg = read_config(path)
    arch = arch_of(cfg, path / "config.json")
    if not weight_files(path):
        raise MarsError(f"{path}: no weights files (*.safetensors) in the model directory")
    cls = getattr(transformers, ARCHITECTURES[cfg["model_type"]][1], None)
    if cls is None:
        raise MarsError(f"{path}: this transformers version has no {ARCHITECTURES[cfg['model_type']][1]}")
    # The image processor first: it is cheap and its absence is a common mistake (a text-only
    # checkpoint, a hand-copied directory), so say so before the slow loads.
    image_processor = load_image_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
    tokenizer = load_tokenizer(path)
    special = special_ids(tokenizer, path)
    kwargs = {"dtype": _dtype(dtype, device), "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if str(device).startswith("cuda"):
        kwargs["device_map"] = str(device)  # straight onto the GPU, not through host memory
    try:
        model = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise MarsError(f"{path}: cannot load model weights: {e}") from None
    if "device_map" not in kwargs:
        model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return Policy(model=model, tokenizer=tokenizer, image_processor=image_processor, arch=arch,
                  path=str(path), fingerprint=fingerprint(path), special=special, end_ids=end_ids(path))
