"""Checkpoint writes are atomic: a process killed mid-write leaves the previous one intact."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

from mars_cli.fsutil import sha256_file

KILLED_WRITER = textwrap.dedent("""
    import os, shutil, signal, sys
    from mars_cli.models.load import load_policy
    from mars_cli.rl import checkpoint

    src, out = sys.argv[1], sys.argv[2]
    pol = load_policy(src)
    real_copy = shutil.copy2

    def copy_then_die(a, b, *k, **kw):
        real_copy(a, b, *k, **kw)  # the weights and one file are already in the temporary dir
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.shutil.copy2 = copy_then_die
    state = {k: v + 1.0 for k, v in pol.model.state_dict().items()}
    checkpoint.save_checkpoint(out, pol.model, state, source=src, meta={"step": 99})
""")


def test_kill_during_save_leaves_previous_checkpoint_loadable(tiny_policy_dir, tmp_path):
    from mars_cli.models.load import load_policy

    prev = tmp_path / "ckpt"
    shutil.copytree(tiny_policy_dir, prev)
    before = {p.name: sha256_file(p) for p in prev.iterdir()}
    p = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tiny_policy_dir), str(prev)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr
    # The kill left a temporary directory holding new weights beside the checkpoint...
    strays = [q for q in tmp_path.iterdir() if q.name.startswith(".ckpt.tmp-")]
    assert strays and (strays[0] / "model.safetensors").is_file()
    # ...and the checkpoint itself byte-for-byte as it was, and loadable.
    assert {q.name: sha256_file(q) for q in prev.iterdir()} == before
    pol = load_policy(prev)
    assert pol.fingerprint == load_policy(tiny_policy_dir).fingerprint


def test_save_replaces_a_previous_checkpoint_and_refuses_its_own_source(tiny_policy_dir, tmp_path):
    import pytest
    import torch

    from mars_cli.errors import MarsError
    from mars_cli.models.load import load_policy
    from mars_cli.rl.checkpoint import read_meta, save_checkpoint

    pol = load_policy(tiny_policy_dir)
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_policy_dir, out)
    state = {k: v * 0.5 for k, v in pol.model.state_dict().items()}
    fp = save_checkpoint(out, pol.model, state, source=tiny_policy_dir, meta={"step": 3, "parent_fingerprint": pol.fingerprint})
    new = load_policy(out)
    assert new.fingerprint == fp != pol.fingerprint
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(dict(new.model.named_parameters())[name], state[name])
    assert read_meta(out)["step"] == 3
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]
    with pytest.raises(MarsError, match="--out must differ from --policy"):
        save_checkpoint(tiny_policy_dir, pol.model, state, source=tiny_policy_dir, meta={})
