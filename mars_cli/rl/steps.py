"""The step folders of a resident trainer: `OUT/step-N/`, the newest with its optimizer state.

    OUT/step-3/                 an HF checkpoint (what `--policy` and servers load)
    OUT/step-4/                 the newest: the checkpoint, plus
    OUT/step-4/optimizer/       DeepSpeed's optimizer state + mars_state.json (RunState)
    OUT/step-4/unprinted_record.json   the step's metrics record, from its save until printed

The optimizer state lives inside the newest step folder, never beside it as a folder
that looks like a checkpoint, and only there: a new step's state is written (crash-safely,
rl/engine.Trainer.save_state) before the previous one is deleted, so at every instant
one step folder holds whole weights and a whole optimizer state to resume from. Folders
are deleted by first renaming them to a trash name that `fsutil.recover_dir` cleans if
the deleting process dies, so a half-deleted folder never looks like a step.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mars_cli import streams
from mars_cli.errors import MarsError, UsageError
from mars_cli.rl.checkpoint import read_meta  # noqa: F401  (re-exported for follow)

OPTIMIZER = "optimizer"
_STEP = re.compile(r"^step-(\d+)$")
_KEEP_BATCH_IDS = 100_000  # ids of trained batches remembered for a restart
_KEEP_VERSIONS = 256


def step_name(n: int) -> str:
    return f"step-{n}"


UNPRINTED = "unprinted_record.json"


def keep_unprinted(path: Path, record: dict) -> None:
    """Save a step's record in its folder until `printed`: a kill between the save and the
    print (a push can take minutes) leaves it for the restart to print (`unprinted`)."""
    from mars_cli.fsutil import atomic_file
    from mars_cli.jsonl import dumps

    with atomic_file(path / UNPRINTED) as tmp:
        tmp.write_bytes(dumps(record))


def printed(path: Path) -> None:
    (path / UNPRINTED).unlink(missing_ok=True)


def unprinted(path: Path) -> dict | None:
    """The record a killed run saved with step folder `path` but never printed, or None."""
    import json

    try:
        rec = json.loads((path / UNPRINTED).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def step_dirs(out: Path) -> list[tuple[int, Path]]:
    """The step folders of `out`, oldest first (interrupted replacements finished first)."""
    from mars_cli.fsutil import recover_dir

    if not out.is_dir():
        return []
    found = []
    for name in os.listdir(out):
        base = name[1:].split(".")[0] if name.startswith(".") else name  # .step-3.swap, .step-3.tmp-…
        if _STEP.match(base):
            recover_dir(out / base)
    for name in os.listdir(out):
        m = _STEP.match(name)
        if m and (out / name).is_dir():
            found.append((int(m.group(1)), out / name))
    return sorted(found)


@dataclass
class RunState:
    """What a restart needs besides weights and optimizer: saved in optimizer/mars_state.json."""

    origin: str  # fingerprint of the --policy the run started from
    step: int = 0
    batches: dict = field(default_factory=dict)  # batch id -> times trained
    versions: dict = field(default_factory=dict)  # server weight version (str) -> step
    fingerprints: dict = field(default_factory=dict)  # checkpoint fingerprint -> step

    def to_meta(self, n: int, fp: str, checkpoint: str) -> dict:
        return {"step": n, "fingerprint": fp, "checkpoint": checkpoint, "origin": self.origin,
                "batches": self.batches, "versions": self.versions, "fingerprints": self.fingerprints}

    @classmethod
    def from_meta(cls, meta: dict, origin: str) -> "RunState":
        return cls(origin=origin, step=int(meta["step"]), batches=dict(meta.get("batches") or {}),
                   versions=dict(meta.get("versions") or {}), fingerprints=dict(meta.get("fingerprints") or {}))

    def trim(self) -> None:
        for name, limit in (("batches", _KEEP_BATCH_IDS), ("versions", _KEEP_VERSIONS), ("fingerprints", _KEEP_VERSIONS)):
            d = getattr(self, name)
            if len(d) > limit:
                setattr(self, name, dict(list(d.items())[-limit:]))


@dataclass
class Resume:
    path: Path
    meta: dict
    fingerprint: str


def find_resume(out: Path, origin: str) -> Resume | None:
    """The newest step folder with a whole optimizer state, checked against the run's origin."""
    from mars_cli.models.load import fingerprint
    from mars_cli.rl.engine import read_state_meta

    dirs = step_dirs(out)
    for n, path in reversed(dirs):
        meta = read_state_meta(path / OPTIMIZER)
        if not meta:
            continue
        if meta.get("origin") != origin:
            raise UsageError(f"{out}: its step folders continue a run that started from another policy "
                             f"({meta.get('origin')}, not {origin}): give another --out")
        fp = fingerprint(path)
        if meta.get("fingerprint") != fp:
            raise MarsError(f"{path / OPTIMIZER}: optimizer state of checkpoint {meta.get('fingerprint')}, "
                            f"but {path} holds {fp}")
        newer = [q for m, q in dirs if m > n]
        if newer and os.environ.get("RANK", "0") == "0":
            streams.warn(f"{', '.join(q.name for q in newer)}: saved without optimizer state (interrupted): "
                         "removed, trained again")
            for q in newer:
                remove_dir(q)
        return Resume(path, meta, fp)
    if dirs:
        streams.warn(f"{out}: step folders without optimizer state: starting from --policy (they are replaced)")
    return None


def remove_dir(path: Path) -> None:
    """Delete a folder so that a kill midway leaves nothing that looks like it."""
    from mars_cli.dirswap import temp_prefix

    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=temp_prefix(path, "trash"), dir=path.parent))
    os.replace(path, trash / "x")
    shutil.rmtree(trash, ignore_errors=True)


def prune(out: Path, newest: int, keep_last: int) -> None:
    """Only step-`newest` keeps optimizer state; only the newest `keep_last` folders stay (0: all)."""
    dirs = step_dirs(out)
    for n, path in dirs:
        if n != newest and (path / OPTIMIZER).exists():
            remove_dir(path / OPTIMIZER)
    if keep_last > 0:
        for _, path in dirs[:-keep_last]:
            remove_dir(path)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (what one save wrote)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return total
