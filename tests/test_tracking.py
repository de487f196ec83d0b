"""`--report-to`: the scalars a record gives, wandb in offline mode (no network), bad choices."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from clirun import Ran


def test_scalars_flatten_nested_numbers_and_leave_out_the_rest():
    from mars_cli.tracking import scalars

    rec = {"kind": "update", "step": 3, "loss": 0.5, "kl": None, "ok": True, "gap": {"mean_abs": 0.1, "tokens": 7},
           "finish": {"answer": 4}, "nan": float("nan"), "out": "ckpt/"}
    assert scalars(rec, "train/") == {"train/step": 3.0, "train/loss": 0.5, "train/gap/mean_abs": 0.1,
                                      "train/gap/tokens": 7.0, "train/finish/answer": 4.0}


def _wandb_records(run_file: Path) -> list:
    """The protobuf records of a .wandb file (LevelDB log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def test_eval_reports_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    f = tmp_path / "judged.jsonl"
    recs = [{"schema_version": 1, "benchmark": "vstar", "id": f"t{i}", "question": "q", "images": [], "answers": ["a"], "group": f"t{i}", "sample": 0, "messages": [], "tool_calls": [],
             "prediction": "a", "finish": "answer", "rewards": {"accuracy": float(i % 2), "format": 1.0},
             "reward": float(i % 2) + 0.5} for i in range(4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    logs = tmp_path / "wb"
    r = Ran(["eval", f, "-q", "--label", "base", "--report-to", "wandb", "--logging-dir", logs, "--step", "5"])
    assert r.exit_code == 0, r.stderr
    [run_file] = list(logs.glob("wandb/offline-run-*/run-*.wandb"))
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
               for rec in _wandb_records(run_file) if rec.WhichOneof("record_type") == "history"]
    assert len(history) == 1
    h = history[0]
    assert h["_step"] == 5 and h["eval/vstar/pass@1"] == 0.5 and h["eval/vstar/format"] == 1.0
    assert json.loads(r.stdout)["pass@1"] == 0.5


def test_report_to_rejects_unknown_backends(tmp_path):
    f = tmp_path / "judged.jsonl"
    f.write_text(json.dumps({"schema_version": 1, "id": "t", "question": "q", "images": [], "answers": ["a"], "group": "t", "sample": 0, "messages": [], "tool_calls": [],
                             "prediction": "a", "finish": "answer", "rewards": {"accuracy": 1.0}, "reward": 1.0}) + "\n")
    r = Ran(["eval", f, "-q", "--report-to", "mlflow"])
    assert r.exit_code == 2 and "unknown --report-to 'mlflow' (choose from none, tensorboard, wandb)" in r.stderr


def test_default_logging_dir_is_runs_command_time(tmp_path, monkeypatch):
    from mars_cli.tracking import open_tracker

    monkeypatch.chdir(tmp_path)
    with open_tracker("tensorboard", logging_dir=None, command="sft") as t:
        t.log({"loss": 1.0}, step=1)
    [d] = list((tmp_path / "runs").iterdir())
    assert d.name.startswith("sft-") and list(d.glob("events.out.tfevents.*"))


def test_a_bad_report_to_stops_update_and_sft_before_any_work(tmp_path):
    for cmd in ("update", "sft"):
        r = Ran([cmd, tmp_path / "no-batch.jsonl", "--policy", tmp_path / "no-policy", "--out", tmp_path / "o",
                 "--report-to", "tensorbord"])
        assert r.exit_code == 2 and "unknown --report-to 'tensorbord'" in r.stderr, (cmd, r.stderr)
        assert not (tmp_path / "o").exists()
