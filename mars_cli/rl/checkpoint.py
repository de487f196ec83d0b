"""Write a trained policy as a Hugging Face checkpoint directory, atomically.

The directory is what transformers and vLLM load: config.json, safetensors weights, and
the tokenizer, chat template, preprocessor and generation files copied from the parent
policy. Two small JSON files travel with it: `mars_model.json` (the content fingerprint
that models.load.fingerprint trusts) and `mars_meta.json` (step, parent fingerprint,
batch hash, metrics and the resolved flags of the run that made it).

Everything is written into a temporary directory beside the target and swapped into
place at the end (fsutil.atomic_dir → replace_dir, journalled), so a kill at any instant
leaves the previous or the new checkpoint at that path once recover_dir has run (every
loader runs it: models.load.model_dir).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mars_cli.errors import MarsError
from mars_cli.fsutil import atomic_dir, read_json

META_FILE = "mars_meta.json"
# Files save_pretrained writes itself, or that describe the parent's weights only.
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
               META_FILE, "mars_model.json"}


def _copied_files(source: Path) -> list[Path]:
    from mars_cli.models.load import weight_files

    weights = {p.name for p in weight_files(source)}
    return sorted(p for p in source.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in weights and p.name not in _NOT_COPIED)


def read_meta(model_dir: str | Path) -> dict:
    """mars_meta.json of a checkpoint ({} when the directory was not written by mars)."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return {}
    meta = read_json(path)
    return meta if isinstance(meta, dict) else {}


def save_checkpoint(out_dir: str | Path, model, state_dict: dict, *, source: str | Path, meta: dict,
                    arch: str | None = None, max_shard_size: str = "5GB") -> str:
    """Save `state_dict` with `model`'s config as an HF checkpoint; return its fingerprint.

    `model` supplies the config and save logic (tied weights, sharding); `state_dict` the
    tensors, which under ZeRO-3 the module itself no longer holds. `source` is the parent
    policy directory the tokenizer and processor files are copied from.
    """
    from mars_cli.models.load import fingerprint
    from mars_cli.models.tiny import write_meta

    source = Path(source)
    out_dir = Path(out_dir)
    if out_dir.resolve() == source.resolve():
        # Replacing the directory we copy from would still be atomic, but the parent
        # fingerprint in the meta would then describe a checkpoint that no longer exists.
        raise MarsError(f"{out_dir}: --out must differ from --policy")
    with atomic_dir(out_dir) as tmp:
        cpu_state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        model.save_pretrained(tmp, state_dict=cpu_state, safe_serialization=True, max_shard_size=max_shard_size)
        for f in _copied_files(source):
            shutil.copy2(f, tmp / f.name)
        fields = {"arch": arch} if arch else {}
        write_meta(tmp, **fields, parent=meta.get("parent_fingerprint"))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return fingerprint(out_dir)
