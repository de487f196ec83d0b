"""Hub names (ORG/NAME) resolved from a Hugging Face cache built here in huggingface_hub's layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clirun import Ran

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, repo: str, src: Path | None = None, *, repo_type: str = "model", files=None) -> Path:
    """models--ORG--NAME/{refs/main, snapshots/<commit>/…} as huggingface_hub writes it."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    base = root / f"{kind}--{repo.replace('/', '--')}"
    snap = base / "snapshots" / COMMIT
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(COMMIT)
    if src is not None:
        shutil.copytree(src, snap)
    else:
        snap.mkdir(parents=True)
        for name, text in (files or {}).items():
            (snap / name).write_text(text)
    return snap


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def test_cache_location_follows_hf_hub_cache_then_hf_home(hf_env, monkeypatch):
    from mars_cli.hub import cache_dir

    monkeypatch.setenv("HOME", str(hf_env))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == hf_env / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(hf_env / "home"))
    assert cache_dir() == hf_env / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_env / "c"))
    assert cache_dir() == hf_env / "c"


def test_a_cached_model_resolves_and_loads(hf_env, monkeypatch, tiny_policy_dir):
    from mars_cli.models.load import fingerprint, load_policy

    monkeypatch.setenv("HF_HOME", str(hf_env / "home"))
    snap = fake_cache(hf_env / "home" / "hub", "Qwen/Tiny-VL", tiny_policy_dir)
    p = load_policy("Qwen/Tiny-VL")
    assert p.path == str(snap) and p.fingerprint == fingerprint(tiny_policy_dir)
    assert fingerprint("Qwen/Tiny-VL@main") == fingerprint(tiny_policy_dir)


def test_an_existing_local_path_wins_over_a_hub_name(hf_env, monkeypatch, tiny_policy_dir):
    from mars_cli.hub import resolve_model

    monkeypatch.setenv("HF_HUB_CACHE", str(hf_env / "cache"))
    fake_cache(hf_env / "cache", "org/model", files={"config.json": "{}"})
    local = hf_env / "work" / "org" / "model"
    local.mkdir(parents=True)
    monkeypatch.chdir(hf_env / "work")
    assert resolve_model("org/model") == Path("org/model")


def test_a_missing_model_says_how_to_download_it(hf_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_env / "empty"))
    monkeypatch.chdir(tmp_path)
    b = tmp_path / "b.jsonl"
    b.write_text("")
    r = Ran(["update", b, "--policy", "Qwen/Qwen2.5-VL-7B-Instruct", "--out", tmp_path / "o"])
    assert r.exit_code == 1
    assert "`hf download Qwen/Qwen2.5-VL-7B-Instruct`" in r.stderr and str(hf_env / "empty") in r.stderr
    from mars_cli.errors import MarsError
    from mars_cli.models.load import load_policy, load_tokenizer

    with pytest.raises(MarsError, match=r"hf download Qwen/Qwen3-VL-8B-Instruct --revision v2"):
        load_tokenizer("Qwen/Qwen3-VL-8B-Instruct@v2")
    with pytest.raises(MarsError, match="no such model directory") as e:  # a plain missing path stays a path error
        load_policy(tmp_path / "nope" / "a" / "b")
    assert "hf download" not in str(e.value)


def test_dataset_names_resolve_for_convert_and_fetch_uses_the_cache(hf_env, monkeypatch, tmp_path):
    cache = hf_env / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # fetch: a cached benchmark is found without the network; an uncached one is refused offline
    snap = fake_cache(cache, "craigwu/vstar_bench", repo_type="dataset", files={"README.md": "v*"})
    r = Ran(["data", "fetch", "vstar"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"schema_version": 1, "name": "vstar", "repo": "craigwu/vstar_bench", "path": str(snap)}
    r = Ran(["data", "fetch", "hr-bench"])
    assert r.exit_code == 1 and "HF_HUB_OFFLINE is set" in r.stderr
    assert "`hf download DreamMr/HR-Bench --repo-type dataset`" in r.stderr
    r = Ran(["data", "fetch", "not-a-benchmark"])
    assert r.exit_code == 1 and "not a known benchmark" in r.stderr
    # convert: ORG/NAME reads the cached snapshot
    from mars_cli.hub import resolve_dataset

    assert resolve_dataset("craigwu/vstar_bench") == snap
    r = Ran(["data", "convert", "someone/missing-bench", "-f", "vstar", "-o", tmp_path / "out"])
    assert r.exit_code == 1 and "hf download someone/missing-bench --repo-type dataset" in r.stderr
