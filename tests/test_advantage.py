"""Advantage estimators against hand-computed cases, a loop reference and properties."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mars_cli.main import app
from mars_cli.rl.advantage import AdvantageConfig, compute
from clirun import Ran

runner = CliRunner()



def reference(rewards, groups, algo, ddof=1, eps=1e-6, batch_ddof=0, batch_eps=1e-9):
    """Plain loops, written from the formulas, independent of the vectorized code."""
    members = {}
    for i, k in enumerate(groups):
        members.setdefault(k, []).append(i)
    adv = [0.0] * len(rewards)
    n_all, m_all = len(rewards), sum(rewards) / len(rewards)
    r_std = math.sqrt(sum((x - m_all) ** 2 for x in rewards) / (n_all - ddof)) if n_all - ddof > 0 else 0.0
    for idx in members.values():
        rs = [rewards[i] for i in idx]
        n = len(rs)
        mean = sum(rs) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in rs) / (n - ddof)) if n - ddof > 0 else 0.0
        for i in idx:
            if max(rs) == min(rs):
                adv[i] = 0.0
            elif algo in ("grpo", "bn-gspo"):
                adv[i] = (rewards[i] - mean) / (std + eps)
            elif algo == "dr-grpo":
                adv[i] = rewards[i] - mean
            elif algo == "grpo-batch-std":
                adv[i] = (rewards[i] - mean) / (r_std + eps)
            elif algo == "rloo":
                adv[i] = rewards[i] - (sum(rs) - rewards[i]) / (n - 1)
    if algo == "bn-gspo":
        m = sum(adv) / len(adv)
        s = math.sqrt(sum((a - m) ** 2 for a in adv) / (len(adv) - batch_ddof))
        adv = [(a - m) / (s + batch_eps) for a in adv]
    return adv


def test_grpo_hand_computed():
    # group g: [1, 0, 0, 1] -> mean .5, unbiased std sqrt(1/3) = 0.57735
    adv, stats = compute([1, 0, 0, 1, 2, 2], ["g", "g", "g", "g", "h", "h"], AdvantageConfig(algo="grpo"))
    s = 1 / math.sqrt(3)
    assert adv[:4].tolist() == pytest.approx([0.5 / (s + 1e-6), -0.5 / (s + 1e-6)] * 1 + [-0.5 / (s + 1e-6), 0.5 / (s + 1e-6)])
    assert adv[4:].tolist() == [0.0, 0.0]  # zero-variance group: exactly 0
    assert stats[0]["group_std"] == pytest.approx(s) and stats[0]["group_size"] == 4
    assert stats[0]["batch_mean"] is None


def test_bn_gspo_hand_computed():
    # groups: [1, 0] -> grpo ±1/(0.70711+1e-6); [0.5, 0.5] -> 0, 0
    adv, stats = compute([1.0, 0.0, 0.5, 0.5], [1, 1, 2, 2], AdvantageConfig())
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    # batch: [a, -a, 0, 0], mean 0, population std a/sqrt(2)
    bstd = a / math.sqrt(2)
    assert adv.tolist() == pytest.approx([a / (bstd + 1e-9), -a / (bstd + 1e-9), 0.0, 0.0])
    assert stats[0]["batch_std"] == pytest.approx(bstd)
    assert stats[0]["batch_ddof"] == 0 and stats[0]["algo"] == "bn-gspo"


def test_dr_grpo_and_rloo_hand_computed():
    r, g = [3.0, 1.0, 2.0], ["x", "x", "x"]
    assert compute(r, g, AdvantageConfig(algo="dr-grpo"))[0].tolist() == pytest.approx([1.0, -1.0, 0.0])
    # rloo: 3 - (1+2)/2 = 1.5, 1 - 2.5 = -1.5, 2 - 2 = 0
    assert compute(r, g, AdvantageConfig(algo="rloo"))[0].tolist() == pytest.approx([1.5, -1.5, 0.0])


def test_grpo_batch_std_hand_computed():
    # rewards [1, 0, 1, 1]: groups x=[1,0] (mean .5), y=[1,1] (constant); all-reward std (ddof 1) = 0.5
    adv, stats = compute([1.0, 0.0, 1.0, 1.0], ["x", "x", "y", "y"], AdvantageConfig(algo="grpo-batch-std", eps=1e-4))
    assert adv.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0])
    assert stats[0]["reward_batch_std"] == pytest.approx(0.5) and stats[0]["batch_std"] is None


def test_single_member_group_gets_zero():
    for algo in ("grpo", "dr-grpo", "rloo"):
        assert compute([0.7], ["solo"], AdvantageConfig(algo=algo))[0].tolist() == [0.0]


rewards_st = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5]) | st.floats(-10, 10, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(rewards_st, st.integers(1, 6), st.sampled_from(["grpo", "bn-gspo", "dr-grpo", "rloo", "grpo-batch-std"]), st.randoms())
def test_vectorized_matches_loop_reference(rewards, n_groups, algo, rnd):
    groups = [rnd.randrange(n_groups) for _ in rewards]  # non-contiguous on purpose
    got = compute(rewards, groups, AdvantageConfig(algo=algo))[0]
    want = reference(rewards, groups, algo)
    assert got.tolist() == pytest.approx(want, rel=1e-6, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=16), st.floats(-100, 100), st.floats(0.1, 50))
def test_group_zscore_is_shift_and_scale_invariant(rewards, shift, scale):
    g = [0] * len(rewards)
    base = compute(rewards, g, AdvantageConfig(algo="grpo", eps=0.0))[0]
    moved = compute([r * scale + shift for r in rewards], g, AdvantageConfig(algo="grpo", eps=0.0))[0]
    if np.ptp(rewards) > 1e-3:
        assert moved.tolist() == pytest.approx(base.tolist(), rel=1e-6, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5]), min_size=2, max_size=8), min_size=1, max_size=8))
def test_bn_gives_zero_mean_unit_variance(group_rewards):
    r = [x for grp in group_rewards for x in grp]
    g = [i for i, grp in enumerate(group_rewards) for _ in grp]
    adv = compute(r, g, AdvantageConfig())[0]
    assert abs(adv.mean()) < 1e-9
    if any(len(set(grp)) > 1 for grp in group_rewards):
        assert adv.std() == pytest.approx(1.0, rel=1e-6)
    else:
        assert np.all(adv == 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=10), st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=10))
def test_grpo_groups_are_independent(a, b):
    alone = compute(a, [0] * len(a), AdvantageConfig(algo="grpo"))[0]
    together = compute(a + b, [0] * len(a) + [1] * len(b), AdvantageConfig(algo="grpo"))[0]
    assert together[: len(a)].tolist() == alone.tolist()


# --- the command --------------------------------------------------------------------


def judged(group, sample, reward):
    return {"schema_version": 1, "id": str(group), "question": "q", "group": group, "sample": sample, "messages": [],
            "prediction": "x", "finish": "answer", "rewards": {"accuracy": reward}, "reward": reward,
            "tokens": {"ids": [1, 2, 3], "mask": [0, 1, 1], "logprobs": [0.0, -0.5, -0.25]}}


def lines(records):
    return "".join(orjson.dumps(r).decode() + "\n" for r in records)


def parse(out):
    return [orjson.loads(x) for x in out.splitlines() if x.strip()]


def test_cli_default_is_bn_gspo_and_keeps_order_and_fields():
    recs = [judged("a", 0, 1.0), judged("b", 0, 0.0), judged("a", 1, 0.0), judged("b", 1, 1.5)]
    res = Ran(["advantage"], input=lines(recs))
    assert res.exit_code == 0, res.stderr
    out = parse(res.stdout)
    assert [(r["group"], r["sample"]) for r in out] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert out[0]["tokens"] == recs[0]["tokens"]
    want = reference([1.0, 0.0, 0.0, 1.5], ["a", "b", "a", "b"], "bn-gspo")
    assert [r["advantage"] for r in out] == pytest.approx(want)
    st0 = out[0]["advantage_stats"]
    assert {"algo", "group_mean", "group_std", "group_size", "batch_mean", "batch_std", "ddof", "eps", "scope"} <= set(st0)
    assert st0["scope"] == "input" and st0["algo"] == "bn-gspo"


def test_cli_flags_reach_the_math():
    recs = [judged("a", 0, 1.0), judged("a", 1, 0.0), judged("a", 2, 0.0)]
    res = Ran(["advantage", "--algo", "grpo", "--ddof", "0", "--eps", "0"], input=lines(recs))
    out = parse(res.stdout)
    # population std of [1,0,0] = sqrt(2)/3
    assert out[0]["advantage"] == pytest.approx((2 / 3) / (math.sqrt(2) / 3))
    assert out[0]["advantage_stats"]["ddof"] == 0


def test_null_reward_drops_group_or_errors_with_strict(tmp_path):
    recs = [judged("a", 0, 1.0), judged("a", 1, None), judged("b", 0, 1.0), judged("b", 1, 0.0)]
    res = Ran(["advantage", "--algo", "grpo"], input=lines(recs))
    assert res.exit_code == 0
    assert [r["group"] for r in parse(res.stdout)] == ["b", "b"]
    assert "null reward" in res.stderr
    f = tmp_path / "in.jsonl"
    f.write_text(lines(recs))
    res = Ran(["advantage", "--strict", str(f), "-o", str(tmp_path / "out.jsonl")])
    assert res.exit_code == 1
    assert f"{f}:2: null reward" in res.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_drop_constant_groups():
    recs = [judged("a", 0, 1.0), judged("a", 1, 1.0), judged("b", 0, 1.0), judged("b", 1, 0.0)]
    res = Ran(["advantage", "--drop-constant-groups"], input=lines(recs))
    assert [r["group"] for r in parse(res.stdout)] == ["b", "b"]


def test_batch_groups_normalizes_per_batch():
    recs = [judged(g, s, r) for g, rs in [("a", [1, 0]), ("b", [1, 0.5]), ("c", [0, 1.5])] for s, r in enumerate(rs)]
    res = Ran(["advantage", "--batch-groups", "2"], input=lines(recs))
    assert res.exit_code == 0, res.stderr
    out = parse(res.stdout)
    first = reference([1, 0, 1, 0.5], ["a", "a", "b", "b"], "bn-gspo")
    last = reference([0, 1.5], ["c", "c"], "bn-gspo")
    assert [r["advantage"] for r in out] == pytest.approx(first + last)
    assert [r["advantage_stats"]["scope"] for r in out] == ["chunk:0"] * 4 + ["chunk:1"] * 2


def test_batch_groups_refuses_a_group_after_its_batch():
    recs = [judged("a", 0, 1), judged("b", 0, 1), judged("a", 1, 0)]
    res = Ran(["advantage", "--batch-groups", "1"], input=lines(recs))
    assert res.exit_code == 1
    assert "<stdin>:3: group 'a' reappears" in res.stderr


def test_bad_algo_is_usage_error():
    res = Ran(["advantage", "--algo", "ppo"], input="")
    assert res.exit_code == 2
    assert "--algo must be one of" in res.stderr


def test_missing_reward_field_names_the_line():
    rec = judged("a", 0, 1.0)
    del rec["reward"]
    res = Ran(["advantage"], input=lines([judged("a", 1, 0.0), rec]))
    assert res.exit_code == 1
    assert "<stdin>:2: missing field 'reward'" in res.stderr


@pytest.mark.parametrize("sample", [[], {}, 1.5, True])
def test_r11_sample_not_an_integer_is_a_located_error(sample):
    rec = judged("a", 0, 1.0)
    rec["sample"] = sample
    res = Ran(["advantage"], input=lines([judged("a", 1, 0.0), rec]))
    assert res.exit_code == 1
    assert "<stdin>:2: field 'sample' must be an integer" in res.stderr


def test_subprocess_chunks_stream_and_head_ends_with_its_summary():
    recs = [judged(f"g{i}", s, float(s % 2)) for i in range(300) for s in range(4)]
    proc = subprocess.run(
        f"{sys.executable} -m mars_cli advantage --batch-groups 8 | head -1",
        shell=True, input=lines(recs).encode(), capture_output=True, timeout=60,
    )
    assert proc.returncode == 0
    # no traceback: the one summary line, which says how the stage ended
    assert re.fullmatch(rb"mars advantage: \d+ of \d+ records written in \d+ batch\(es\); .*; its reader went away\n", proc.stderr), proc.stderr
    assert orjson.loads(proc.stdout)["group"] == "g0"


# --- the batch stamp that `mars update --follow` steps on ---------------------------------

def test_every_record_carries_its_batch_and_ids_are_content_hashes():
    recs = [judged(g, s, float((i + s) % 3)) for i, g in enumerate("abcd") for s in range(3)]
    res = Ran(["advantage", "--batch-groups", "2"], input=lines(recs))
    assert res.exit_code == 0, res.stderr
    out = parse(res.stdout)
    first, second = {r["batch"]["id"] for r in out[:6]}, {r["batch"]["id"] for r in out[6:]}
    assert len(first) == len(second) == 1 and first != second
    assert all(r["batch"]["size"] == 6 for r in out)
    # Same input, byte-identical output.
    assert Ran(["advantage", "--batch-groups", "2"], input=lines(recs)).stdout == res.stdout
    # One reward changed, or another setting: another id (for that batch only).
    changed = [dict(r) for r in recs]
    changed[7] = {**changed[7], "reward": 2.5}
    out2 = parse(Ran(["advantage", "--batch-groups", "2"], input=lines(changed)).stdout)
    assert out2[0]["batch"] == out[0]["batch"] and out2[6]["batch"]["id"] != out[6]["batch"]["id"]
    out3 = parse(Ran(["advantage", "--batch-groups", "2", "--eps", "1e-4"], input=lines(recs)).stdout)
    assert out3[0]["batch"]["id"] != out[0]["batch"]["id"]
    # The sample index is part of the content.
    swapped = [dict(r, sample=2 - r["sample"]) if r["group"] == "a" else r for r in recs]
    out4 = parse(Ran(["advantage", "--batch-groups", "2"], input=lines(swapped)).stdout)
    assert out4[0]["batch"]["id"] != out[0]["batch"]["id"]


def test_without_batch_groups_the_whole_input_is_one_batch_in_any_order():
    recs = [judged("a", 0, 1.0), judged("b", 0, 0.0), judged("a", 1, 0.0), judged("b", 1, 1.5)]
    out = parse(Ran(["advantage"], input=lines(recs)).stdout)
    assert len({json.dumps(r["batch"]) for r in out}) == 1 and out[0]["batch"]["size"] == 4
    # A dropped group is not part of the batch.
    recs.append(judged("c", 0, None))
    out = parse(Ran(["advantage"], input=lines(recs)).stdout)
    assert [r["batch"]["size"] for r in out] == [4] * 4


def test_group_size_closes_a_batch_on_its_last_record():
    """With --group-size the batch is written before the next group's first record arrives."""
    recs = [judged(g, s, float(s)) for g in ("a", "b", "c") for s in range(2)]
    proc = subprocess.Popen([sys.executable, "-m", "mars_cli", "advantage", "--batch-groups", "1", "--group-size", "2"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(lines(recs[:2]).encode())
        proc.stdin.flush()
        got = [proc.stdout.readline(), proc.stdout.readline()]  # arrives while stdin stays open
        assert [orjson.loads(x)["group"] for x in got] == ["a", "a"]
        proc.stdin.write(lines(recs[2:]).encode())
        proc.stdin.close()
        rest = parse(proc.stdout.read().decode())
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert [r["group"] for r in rest] == ["b", "b", "c", "c"]
    assert len({r["batch"]["id"] for r in rest}) == 2
    res = Ran(["advantage", "--batch-groups", "1", "--group-size", "2"], input=lines([judged("a", s, 1.0) for s in range(3)]))
    assert res.exit_code == 1 and "<stdin>:3: group 'a' has more than --group-size 2 records" in res.stderr


def test_batch_size_is_a_hidden_alias_that_warns():
    recs = [judged(g, s, float(s)) for g in ("a", "b") for s in range(2)]
    old = Ran(["advantage", "--batch-size", "1"], input=lines(recs))
    new = Ran(["advantage", "--batch-groups", "1"], input=lines(recs))
    assert old.exit_code == 0 and old.stdout == new.stdout
    assert old.stderr.count("--batch-size is now --batch-groups") == 1 and "is now" not in new.stderr
    assert "--batch-size" not in Ran(["advantage", "--help"]).stdout


@pytest.mark.parametrize("command", ["advantage", "judge"])
def test_stage_waiting_for_input_ends_with_its_summary_when_its_reader_goes(command):
    """`update --follow --max-steps N` exits while upstream stages are idle on their input."""
    proc = subprocess.Popen([sys.executable, "-m", "mars_cli", command], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rec = {**judged("a", 0, 1.0), "answers": ["yes"], "prediction": "yes"}  # a gold: judge has nothing to warn of
        proc.stdin.write(lines([rec]).encode())  # input still open: the stage waits
        proc.stdin.flush()
        import time

        time.sleep(2.0)  # past the stage's start-up
        assert proc.poll() is None
        proc.stdout.close()  # the reader goes away
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read().decode()
        assert re.fullmatch(rf"mars {command}: (0 of )?[01] records? .*; its reader went away\n", err), err
    finally:
        proc.kill()
        proc.stdin.close()


def test_sampled_by_means_each_judged_reward_and_skips_what_is_not_a_number():
    from mars_cli.rl.sampled_by import SampledBy

    tally = SampledBy()
    recs = [{"reward": 1.0, "rewards": {"accuracy": 1.0, "format": 1.0}},
            {"reward": 0.5, "rewards": {"accuracy": 0.0, "format": 1.0, "verdict": "wrong"}},
            {"reward": float("nan"), "rewards": {"accuracy": True}}, {"reward": None}, {"no": "rewards"}]
    assert [r for _, r in tally.tally((i, r) for i, r in enumerate(recs))] == recs
    assert tally.rewards() == {"accuracy": 0.5, "format": 1.0, "reward": 0.75}
    assert SampledBy().rewards() == {}


def test_records_as_written_pass_through_byte_for_byte_and_any_spelling_gives_the_same_records():
    # The stage adds its fields to each line as read instead of serializing the record again
    # (a 2k-token trajectory costs a copy, not a dump); every other spelling is parsed and written.
    recs = [judged("a", 0, 1.0), judged("a", 1, 0.0), judged("b", 0, 0.5), judged("b", 1, 0.0), judged("c", 0, 1.0)]
    compact = lines(recs)
    whole = Ran(["advantage"], input=compact)
    assert whole.exit_code == 0, whole.stderr
    want = parse(whole.stdout)
    assert [{k: v for k, v in r.items() if k not in ("advantage", "advantage_stats", "batch")} for r in want] == recs
    assert whole.stdout.splitlines()[0].startswith(compact.splitlines()[0][:-1] + ',"advantage":')
    rerun = [{k: v for k, v in r.items() if k != "advantage"} for r in want]  # stale stats and batch: written whole
    mixed = ("\ufeff" + json.dumps(recs[0], indent=None) + "\n"  # a byte-order mark and spaces
             + json.dumps({k: v for k, v in recs[1].items() if k != "schema_version"}) + "\n"
             + orjson.dumps(rerun[2]).decode() + "\n" + lines(recs[3:]))
    res = Ran(["advantage"], input=mixed)
    assert res.exit_code == 0, res.stderr
    got = parse(res.stdout)
    assert got == want  # the record without a schema version is written whole, and stamped
    # and a second run over its own output leaves the records as they were
    again = Ran(["advantage"], input=whole.stdout)
    assert again.exit_code == 0, again.stderr
    assert parse(again.stdout) == want
