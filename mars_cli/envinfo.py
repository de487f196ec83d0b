"""What `mars env` reports: versions, the accelerator, and the settings in the environment.

Meant to be pasted into a bug report, so secrets never appear: a variable whose name says
it holds one (…KEY, …TOKEN, …SECRET, …PASSWORD) shows only that it is set and its length,
and every other value goes through `mars_cli.urls.redact`, the masking logs use too (URL
passwords, bare tokens before `@`, secret query values). Versions come from package
metadata, not imports, so a broken install (vLLM without a GPU, say) is still reported
rather than crashing the report; only torch is imported, for the CUDA facts.
"""

from __future__ import annotations

import os
import platform
import re
import sys

from mars_cli.urls import redact

PACKAGES = ("torch", "transformers", "deepspeed", "vllm", "accelerate", "tokenizers", "safetensors",
            "typer", "numpy", "pillow", "faiss-cpu", "sentence-transformers", "bm25s", "httpx", "openai")
# Variables mars or the libraries it drives read, besides MARS_*.
OTHER_VARS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "SERPER_API_KEY", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR",
              "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_EXTENSIONS_DIR", "VLLM_USE_V1",
              "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
_SECRET = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)


def masked(name: str, value: str) -> str:
    """The value as it may be shown: secrets reduced to their length, URL credentials masked."""
    if _SECRET.search(name):
        return f"(set, {len(value)} characters)" if value else "(set, empty)"
    return redact(value)


def versions() -> dict[str, str | None]:
    from importlib import metadata

    from mars_cli import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "mars": __version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def accelerator() -> dict:
    """CUDA as torch sees it (torch imported here; its absence is reported, not raised)."""
    try:
        import torch
    except Exception as e:  # a broken torch is exactly what a bug report needs to show
        return {"torch_import_error": f"{type(e).__name__}: {e}"}
    info: dict = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  "devices": []}
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                    "capability": f"{p.major}.{p.minor}"})
    return info


def settings(environ=None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    names = sorted(n for n in env if n.startswith("MARS_")) + [n for n in OTHER_VARS if n in env]
    return {n: masked(n, env[n]) for n in names}


def report() -> dict:
    return {"kind": "env", "versions": versions(), "platform": platform.platform(), "executable": sys.executable,
            "cpus": os.cpu_count(), "accelerator": accelerator(), "settings": settings()}


def format_report(rep: dict) -> str:
    lines = ["versions:"]
    lines += [f"  {k:<22} {v if v is not None else '(not installed)'}" for k, v in rep["versions"].items()]
    lines += [f"platform:   {rep['platform']}", f"python:     {rep['executable']}", f"cpus:       {rep['cpus']}"]
    acc = rep["accelerator"]
    if "torch_import_error" in acc:
        lines.append(f"cuda:       torch does not import ({acc['torch_import_error']})")
    else:
        lines.append(f"cuda:       {'available' if acc['cuda_available'] else 'not available'}"
                     f" (torch built for CUDA {acc['torch_cuda'] or 'none'}, cuDNN {acc['cudnn'] or 'none'})")
        lines += [f"  gpu {i}: {d['name']}, {d['memory_gib']} GiB, compute {d['capability']}" for i, d in enumerate(acc["devices"])]
    lines.append("settings:" if rep["settings"] else "settings:   (no MARS_* or related variables set)")
    lines += [f"  {k}={v}" for k, v in rep["settings"].items()]
    return "\n".join(lines)
