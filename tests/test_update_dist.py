"""Several processes (gloo on a CPU) take the same step as one: sharding, all-reduce, ZeRO-3 gathers."""

from __future__ import annotations

import json

import pytest
import torch

import helpers_train as H


@pytest.mark.slow
def test_two_processes_equal_one(tiny_policy_dir, tmp_path):
    from mars_cli.models.load import load_policy

    batch = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", [1.0, -1.0, 0.5], image_dir=tmp_path)
    common = ["--policy", tiny_policy_dir, "--zero", "2", "--lr", "1e-3", "--micro-batch-tokens", "60", "--beta", "0"]
    one = H.Ran(["update", batch, "--out", tmp_path / "one", *common])
    assert one.exit_code == 0, one.stderr
    two = H.Ran(["update", batch, "--out", tmp_path / "two", "--nproc", "2", "--state", tmp_path / "st", *common])
    assert two.exit_code == 0, two.stderr
    # Both ranks wrote their optimizer shards into the one directory rank 0 swapped in.
    assert json.loads((tmp_path / "st" / "mars_state.json").read_text())["step"] == 1
    assert sorted(q.name for q in tmp_path.iterdir() if q.name.startswith(".")) == []
    [m1], [m2] = [json.loads(x) for x in one.stdout.splitlines()], [json.loads(x) for x in two.stdout.splitlines()]
    for k in ("loss", "grad_norm", "tokens", "policy_tokens", "trajectories", "ratio_mean"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-5), k
    assert m2["logprob_gap"]["tokens"] == m1["logprob_gap"]["tokens"]
    assert json.loads((tmp_path / "two" / "mars_meta.json").read_text())["flags"]["world_size"] == 2
    a = dict(load_policy(tmp_path / "one").model.named_parameters())
    b = dict(load_policy(tmp_path / "two").model.named_parameters())
    # Adam's first step is ≈ lr·g/|g|: where g is ~0 (key biases cannot change attention)
    # the summation order of the all-reduce shows. All but one weight in a thousand agree
    # to 1% of a step (lr 1e-3), none is off by 5%; wrong sharding misses by whole steps.
    for n in a:
        diff = (a[n] - b[n]).abs()
        assert diff.max() <= 5e-5 and int((diff > 1e-5).sum()) <= max(1, diff.numel() // 1000), n


@pytest.fixture(scope="module")
def small_policy_dir(tmp_path_factory):
    """The tiny model with an 8k vocabulary: the output layer no longer dominates a CPU step."""
    from mars_cli.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-8k", seed=0, vocab=8192))


def _uneven_batch(policy_dir, tmp_path):
    """Three trajectories, sharded 2 + 1: rank 0 gets both images, rank 1 none."""
    from mars_cli.jsonl import read_records, write_records

    path = H.write_batch(policy_dir, tmp_path / "b.jsonl", [1.0, -1.0, 0.5])
    recs = list(read_records([str(path)]))
    pad = recs[0]["tokens"]["ids"]
    imaged = H.write_batch(policy_dir, tmp_path / "img.jsonl", [1.0, -1.0, 0.5], image_dir=tmp_path)
    with_images = list(read_records([str(imaged)]))
    recs[0], recs[2] = with_images[0], with_images[2]
    assert pad and not recs[1]["tokens"]["images"] and recs[0]["tokens"]["images"]
    write_records(recs, path)
    return path


def _weights_close(a_dir, b_dir):
    from mars_cli.models.load import load_policy

    a = dict(load_policy(a_dir).model.named_parameters())
    b = dict(load_policy(b_dir).model.named_parameters())
    for n in a:  # the bound of test_two_processes_equal_one
        diff = (a[n] - b[n]).abs()
        assert diff.max() <= 5e-5 and int((diff > 1e-5).sum()) <= max(1, diff.numel() // 1000), n


def _one_record(ran):
    assert ran.exit_code == 0, ran.stderr
    assert " is now " not in ran.stderr  # the relaunched ranks get the flags' current names
    return [json.loads(x) for x in ran.stdout.splitlines()][-1]


def _zero2_and_zero3(command, batch, tmp_path, *common):
    """The last record of COMMAND under ZeRO-2 in one process (out z2), then ZeRO-3 over two (out z3)."""
    ref = _one_record(H.Ran([command, batch, "--out", tmp_path / "z2", "--zero", "2", *common]))
    got = _one_record(H.Ran([command, batch, "--out", tmp_path / "z3", "--zero", "3", "--nproc", "2", *common]))
    return ref, got


def test_zero3_two_ranks_uneven_update_equals_zero2(small_policy_dir, tmp_path):
    batch = _uneven_batch(small_policy_dir, tmp_path)
    # --batch-size 2: the second step's one trajectory leaves rank 1 nothing but a filler.
    ref, got = _zero2_and_zero3("update", batch, tmp_path, "--policy", small_policy_dir, "--lr", "1e-3",
                                "--micro-batch-tokens", "60", "--beta", "0", "--batch-size", "2")
    for k in ("loss", "grad_norm", "grad_norm_max", "ratio_mean"):
        assert got[k] == pytest.approx(ref[k], rel=1e-3), k
    assert ref["grad_norm"] > 0.1 and got["tokens"] == ref["tokens"] and got["steps"] == ref["steps"] == 2
    _weights_close(tmp_path / "z2", tmp_path / "z3")


def test_zero3_two_ranks_uneven_sft_equals_zero2(small_policy_dir, tmp_path):
    batch = _uneven_batch(small_policy_dir, tmp_path)
    ref, got = _zero2_and_zero3("sft", batch, tmp_path, "--policy", small_policy_dir, "--lr", "1e-3",
                                "--micro-batch-tokens", "60", "--batch-size", "3", "--warmup", "0")
    for k in ("nll_before", "nll_after", "train_nll", "grad_norm"):
        assert got[k] == pytest.approx(ref[k], rel=1e-3), k
    assert ref["nll_after"] < ref["nll_before"] and got["tokens"] == ref["tokens"]
    _weights_close(tmp_path / "z2", tmp_path / "z3")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["update", "sft"])
def test_two_nodes_equal_two_processes_on_one(small_policy_dir, tmp_path, command):
    """Two launcher groups on localhost (one process each) take the step one node with --nproc 2 takes."""
    import os
    import subprocess
    import sys

    batch = _uneven_batch(small_policy_dir, tmp_path)
    common = ["--policy", small_policy_dir, "--lr", "1e-3", "--micro-batch-tokens", "60", "--zero", "3"]
    common += ["--beta", "0"] if command == "update" else ["--batch-size", "3", "--warmup", "0", "--no-eval"]
    ref = _one_record(H.Ran([command, batch, "--out", tmp_path / "one", "--nproc", "2", *common]))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    nodes = [subprocess.Popen([sys.executable, "-m", "mars_cli", command, str(batch), "--out", str(tmp_path / "two"),
                               "--nnodes", "2", "--node-rank", str(r), "--master-addr", "127.0.0.1",
                               "--master-port", str(port), *common], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert outs[1][0] == ""  # node 1 writes nothing: global rank 0 (node 0) reports
    got = [json.loads(x) for x in outs[0][0].splitlines()][-1]
    keys = ("loss", "grad_norm", "tokens") if command == "update" else ("train_nll", "grad_norm", "tokens")
    for k in keys:
        assert got[k] == pytest.approx(ref[k], rel=1e-6), k
    meta = json.loads((tmp_path / "two" / "mars_meta.json").read_text())
    assert meta["flags"]["world_size"] == 2
    _weights_close(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "2"], "--nnodes needs --master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"], "--node-rank must be in [0, 2)"),
])
def test_node_flags_are_checked_before_launching(tiny_policy_dir, tmp_path, flags, message):
    batch = H.write_batch(tiny_policy_dir, tmp_path / "b.jsonl", [1.0])
    for command in ("update", "sft"):
        ran = H.Ran([command, batch, "--policy", tiny_policy_dir, "--out", tmp_path / "o", *flags])
        assert ran.exit_code == 2 and message in ran.stderr, ran.stderr


@pytest.mark.parametrize("argv", [["--local_rank=1", "update", "b.jsonl"], ["--local-rank", "1", "update", "b.jsonl"]])
def test_deepspeed_launchers_local_rank_before_the_command(monkeypatch, argv):
    """`deepspeed --module mars_cli update …` runs `mars --local_rank=N update …` on each rank."""
    import os

    from mars_cli.main import _launcher_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _launcher_local_rank(argv) == ["update", "b.jsonl"] and os.environ["LOCAL_RANK"] == "1"
    assert _launcher_local_rank(["update", "--local_rank=0"]) == ["update", "--local_rank=0"]  # the command's own flag
