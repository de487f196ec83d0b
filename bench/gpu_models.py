"""A random-weight Qwen2.5-VL checkpoint of the 7B model's real width, with few layers.

    python bench/gpu_models.py OUT [--layers 2] [--device cuda] [--scale 1.0]

Same tokenizer and image processor as `mars tiny-model`; the language model and vision
tower get Qwen2.5-VL-7B-Instruct's widths (hidden 3584, MLP 18944, 28 heads / 4 KV heads,
head dim 128, untied 152k-row embeddings; vision 1280 wide, 16 heads, 3420 MLP) and
`--layers` of depth, so per-token costs (attention width, vocabulary projection, vision
patches) are the real ones while the file stays a few GB. `--scale` shrinks every width
(for a dry run on a CPU). Prints one JSON line {path, params, fingerprint}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QWEN25_VL_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4}
VISION_7B = {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16}


def make_wide(out: Path, *, layers: int = 2, device: str = "cuda", scale: float = 1.0) -> dict:
    import shutil

    import torch
    import transformers

    from mars_cli.models.tiny import describe, make_tiny_model, write_meta

    base = make_tiny_model(out.with_name(out.name + ".base"), arch="qwen2.5-vl", seed=0, layers=layers)
    cfg = json.loads((base / "config.json").read_text())
    heads = max(1, round(QWEN25_VL_7B["num_attention_heads"] * scale))
    kv = max(1, round(QWEN25_VL_7B["num_key_value_heads"] * scale))
    heads -= heads % kv
    text = cfg["text_config"]
    text.update(hidden_size=heads * 128, intermediate_size=int(QWEN25_VL_7B["intermediate_size"] * scale) // 64 * 64 or 64,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)
    text["rope_parameters"] = {**text.get("rope_parameters", {}), "mrope_section": [16, 24, 24]}  # head dim 128
    vheads = max(1, round(VISION_7B["num_heads"] * scale))
    cfg["vision_config"].update(hidden_size=vheads * 80, intermediate_size=int(VISION_7B["intermediate_size"] * scale) or 64,
                                num_heads=vheads, out_hidden_size=text["hidden_size"])
    cfg["tie_word_embeddings"] = False
    config = transformers.Qwen2_5_VLConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        torch.manual_seed(0)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.generation_config = transformers.GenerationConfig.from_pretrained(base)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "preprocessor", "chat_template", "vocab", "merges", "special")):
            shutil.copy2(f, tmp / f.name)
    params = sum(p.numel() for p in model.parameters())
    write_meta(tmp, arch="qwen2.5-vl", seed=0, params=params, width="qwen2.5-vl-7b", layers=layers)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(base)
    return describe(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every width (a CPU dry run)")
    a = ap.parse_args()
    print(json.dumps(make_wide(a.out, layers=a.layers, device=a.device, scale=a.scale)))


if __name__ == "__main__":
    main()
