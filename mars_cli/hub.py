"""Hugging Face Hub names (`Qwen/Qwen2.5-VL-7B-Instruct`) resolved from the local cache.

    resolve_model("Qwen/Qwen2.5-VL-7B-Instruct")   # -> Path of the cached snapshot
    resolve_dataset("sensenova/HR-MMSearch")       # the same for a dataset repository

Offline first: a name is looked up in the local cache only (huggingface_hub's own layout,
`models--ORG--NAME/snapshots/<commit>/`), never downloaded on the way. A path that exists
wins over a Hub name. The cache is where huggingface_hub puts it: HF_HUB_CACHE, else
HF_HOME/hub, else ~/.cache/huggingface/hub, read when the name is resolved (not when the
package was imported). When the name is not cached the error gives the command that
downloads it. `fetch_dataset` is the one place that downloads (`mars data fetch`), and it
refuses when HF_HUB_OFFLINE is set.

`NAME@REVISION` pins a branch, tag or commit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mars_cli.errors import MarsError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[\w./-]+)?$")

# The benchmarks `mars data convert` reads, by --format, and where they are published.
BENCHMARK_REPOS = {
    "hr-mmsearch": "sensenova/HR-MMSearch",
    "sensenova-mars": "sensenova/SenseNova-MARS-Data",
    "mmsearch": "CaraJ/MMSearch",
    "fvqa": "lmms-lab/FVQA",
    "vstar": "craigwu/vstar_bench",
    "hr-bench": "DreamMr/HR-Bench",
    "mme-realworld": "yifanzhang114/MME-RealWorld",
}


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_id(name: str | os.PathLike) -> bool:
    """ORG/NAME[@REV] that is not an existing path (./org/name or /abs are always paths)."""
    s = str(name)
    return bool(_HUB_ID.match(s)) and not Path(s).expanduser().exists()


def download_command(repo: str, *, repo_type: str = "model", revision: str | None = None) -> str:
    cmd = f"hf download {repo}"
    if repo_type != "model":
        cmd += f" --repo-type {repo_type}"
    if revision:
        cmd += f" --revision {revision}"
    return cmd


def _split(name: str) -> tuple[str, str | None]:
    repo, _, rev = str(name).partition("@")
    return repo, rev or None


def cached_snapshot(name: str, *, repo_type: str = "model") -> Path | None:
    """The cached snapshot directory of a Hub name, or None when it is not in the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, rev = _split(name)
    try:
        path = snapshot_download(repo, repo_type=repo_type, revision=rev, cache_dir=str(cache_dir()), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return Path(path)


def resolve(name: str | os.PathLike, *, repo_type: str = "model") -> Path:
    """An existing path as it is; a Hub name as its cached snapshot; else a MarsError with the download command."""
    if not is_hub_id(name):
        return Path(name)
    snap = cached_snapshot(str(name), repo_type=repo_type)
    if snap is None:
        repo, rev = _split(str(name))
        what = "dataset" if repo_type == "dataset" else "model"
        raise MarsError(f"{name}: no such directory, and no cached copy of the Hub {what} {repo}"
                        f"{'@' + rev if rev else ''} in {cache_dir()}; download it with "
                        f"`{download_command(repo, repo_type=repo_type, revision=rev)}` "
                        "(or give a local directory)")
    return snap


def resolve_model(name: str | os.PathLike) -> Path:
    return resolve(name, repo_type="model")


def resolve_dataset(name: str | os.PathLike) -> Path:
    return resolve(name, repo_type="dataset")


def fetch_dataset(name: str) -> tuple[str, Path]:
    """Download a benchmark (a --format name or ORG/NAME) into the cache; (repo, snapshot path)."""
    repo = BENCHMARK_REPOS.get(name, name)
    if not _HUB_ID.match(repo):
        known = ", ".join(f"{k} ({v})" for k, v in BENCHMARK_REPOS.items())
        raise MarsError(f"{name!r}: not a known benchmark or a Hub dataset name ORG/NAME (known: {known})")
    snap = cached_snapshot(repo, repo_type="dataset")
    if snap is not None:
        return repo, snap
    r, rev = _split(repo)
    if offline():
        raise MarsError(f"{repo}: not in {cache_dir()} and HF_HUB_OFFLINE is set; "
                        f"where the network allows: `{download_command(r, repo_type='dataset', revision=rev)}`")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(r, repo_type="dataset", revision=rev, cache_dir=str(cache_dir()))
    except Exception as e:  # network, auth (gated datasets: HF_TOKEN from the environment), missing repo
        raise MarsError(f"{repo}: download failed: {type(e).__name__}: {e}") from None
    return repo, Path(path)
