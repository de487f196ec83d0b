"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


@pytest.fixture(autouse=True)
def _launcher_env():
    """A trainer run in-process fills in single-process launcher variables (rl.engine.
    setup_distributed) and keeps its rendezvous port open; a command a later test starts as
    a subprocess must not inherit that port (EADDRINUSE)."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A tiny random-weight Qwen2.5-VL checkpoint, built once per test session."""
    from mars_cli.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen25vl", arch="qwen2.5-vl", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """A tiny random-weight Qwen3-VL checkpoint, built once per test session."""
    from mars_cli.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3vl", arch="qwen3-vl", seed=0)
