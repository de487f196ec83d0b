"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


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
