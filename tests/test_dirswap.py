"""Directory replacement survives a kill at any instant; recovery finishes it (D3, K2, K4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mars_cli.fsutil import atomic_dir, make_temp_dir, recover_dir, replace_dir

# Replaces DEST with a new version, dying (SIGKILL) at the K-th filesystem rename.
KILLED_SWAP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mars_cli import dirswap
    from mars_cli.fsutil import atomic_dir

    dest, k = Path(sys.argv[1]), int(sys.argv[2])
    real = os.replace
    calls = [0]

    def replace(a, b):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        real(a, b)

    dirswap.os.replace = replace
    with atomic_dir(dest) as tmp:
        (tmp / "version").write_text("new")
        (tmp / "weights.bin").write_bytes(b"w" * 1000)
    print(calls[0])
""")


def _run_swap(dest: Path, k: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLED_SWAP, str(dest), str(k)], capture_output=True, text=True,
                          timeout=60)


def test_d3_kill_at_every_rename_of_a_replacement_leaves_old_or_new(tmp_path):
    dest = tmp_path / "ck"
    dest.mkdir()
    (dest / "version").write_text("old")
    n = int(_run_swap(dest, 0).stdout)  # renames of one uninterrupted replacement
    assert n >= 3 and (dest / "version").read_text() == "new"
    seen = set()
    for k in range(1, n + 1):
        (dest / "version").write_text("old")
        p = _run_swap(dest, k)
        assert p.returncode == -signal.SIGKILL, p.stderr
        recover_dir(dest)
        # Whatever instant the kill hit, one whole version is at dest and nothing else remains.
        version = (dest / "version").read_text()
        assert version in ("old", "new")
        if version == "new":
            assert (dest / "weights.bin").stat().st_size == 1000
        seen.add(version)
        assert sorted(q.name for q in tmp_path.iterdir()) == ["ck"], k
    assert seen == {"old", "new"}  # the journal rolls a completed new version forward


def test_d3_backup_of_an_older_mars_is_restored_when_dest_is_missing(tmp_path):
    dest = tmp_path / "state"
    legacy = tmp_path / ".state.old-abc123"
    (legacy / "x").mkdir(parents=True)
    (legacy / "x" / "mars_state.json").write_text("{}")
    recover_dir(dest)
    assert (dest / "mars_state.json").is_file() and not legacy.exists()
    # The optimizer state's own older layout: the directory itself renamed to .NAME.old-PORT.
    state = tmp_path / "st"
    old_state = tmp_path / ".st.old-29500"
    (old_state / "state").mkdir(parents=True)
    (old_state / "mars_state.json").write_text('{"step": 4}')
    from mars_cli.rl.engine import read_state_meta

    assert read_state_meta(state) == {"step": 4} and not old_state.exists()


def test_k4_temporary_dirs_of_killed_writers_are_deleted_next_run(tmp_path):
    dest = tmp_path / "index"
    code = ("import os, signal, sys; from pathlib import Path; from mars_cli.fsutil import make_temp_dir;"
            "t = make_temp_dir(Path(sys.argv[1])); (t / 'big').write_bytes(b'x' * 100); os.kill(os.getpid(), 9)")
    p = subprocess.run([sys.executable, "-c", code, str(dest)], timeout=60)
    assert p.returncode == -9
    mine = make_temp_dir(dest)  # a live writer's temporary is left alone
    stale = [q for q in tmp_path.iterdir() if q != mine]
    assert len(stale) == 1 and stale[0].name.startswith(".index.tmp-")
    with atomic_dir(dest) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(["index", mine.name])


def test_k2_replaced_directories_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "ck") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            fd = os.open(tmp / "sub" / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ck" / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ck" / "sub" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_replace_dir_needs_a_temporary_beside_dest(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError):
        replace_dir(tmp_path / "a", tmp_path / "b" / "dest")
    t = make_temp_dir(tmp_path / "dest")
    (t / "f").write_text("1")
    replace_dir(t, tmp_path / "dest")
    assert (tmp_path / "dest" / "f").read_text() == "1"


def test_k4_temporary_files_of_killed_writers_are_deleted_next_write(tmp_path):
    from mars_cli.jsonl import write_records

    out = tmp_path / "judged.jsonl"
    code = ("import os, sys; from mars_cli.jsonl import RecordWriter; w = RecordWriter(sys.argv[1]);"
            "w.write({'a': 1}); w._f.flush(); os.kill(os.getpid(), 9)")
    assert subprocess.run([sys.executable, "-c", code, str(out)], timeout=60).returncode == -9
    assert [q.name.startswith(".judged.jsonl.tmp-") for q in tmp_path.iterdir()] == [True]
    write_records([{"b": 2}], out)
    assert [q.name for q in tmp_path.iterdir()] == ["judged.jsonl"]


def test_k2_a_written_checkpoint_honours_the_umask(tmp_path):
    from mars_cli.models.tiny import make_tiny_model

    old = os.umask(0o027)
    try:
        make_tiny_model(tmp_path / "m", arch="qwen2.5-vl", seed=0)
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()} == {0o640}
