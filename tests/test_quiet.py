"""Weaker messages made clear: no tool notes before a fatal error, libraries quiet unless -v."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from clirun import Ran
from mars_cli import streams


def test_hold_warnings_prints_on_success_drops_on_failure(capsys):
    with streams.hold_warnings():
        streams.warn("text search is off")
        assert capsys.readouterr().err == ""
    assert capsys.readouterr().err == "mars: text search is off\n"
    try:
        with streams.hold_warnings():
            streams.warn("text search is off")
            raise RuntimeError("the real problem")
    except RuntimeError:
        pass
    assert capsys.readouterr().err == ""


def test_rollout_fatal_error_stands_alone(tmp_path):
    task = {"id": "t", "question": "q?", "images": [], "answers": ["a"]}
    r = Ran(["rollout", "--policy", tmp_path / "no-model"], input=json.dumps(task) + "\n")
    assert r.exit_code != 0
    assert "is off" not in r.stderr and "no-model" in r.stderr


def test_deepspeed_accelerator_note_only_with_verbose():
    code = ("import sys; from mars_cli import streams; streams.verbosity = int(sys.argv[1]); "
            "from mars_cli.models.load import quiet_deepspeed; quiet_deepspeed(); import deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    quiet = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "Setting accelerator" not in quiet.stderr + quiet.stdout
    loud = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, env=env, timeout=300)
    assert "Setting accelerator to CPU" in loud.stderr + loud.stdout


def test_loading_a_policy_keeps_deepspeeds_note_off_stderr(tiny_policy_dir):
    """Any command that loads a policy (here `rollout --check`): transformers imports DeepSpeed."""
    code = ("import sys; from mars_cli.models.load import load_policy; load_policy(sys.argv[1]); "
            "import deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    r = subprocess.run([sys.executable, "-c", code, str(tiny_policy_dir)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Setting accelerator" not in r.stderr + r.stdout


def test_transformers_bars_only_with_verbose(monkeypatch):
    from transformers.utils import logging as hf_logging

    from mars_cli.models.load import quiet_transformers

    monkeypatch.setattr(streams, "verbosity", 0)
    quiet_transformers()
    assert not hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    monkeypatch.setattr(streams, "verbosity", 1)
    quiet_transformers()
    assert hf_logging.is_progress_bar_enabled()
