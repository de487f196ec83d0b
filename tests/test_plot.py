"""`mars plot` on a real run (sft, two updates, evals of each checkpoint), TensorBoard events
read back by TensorBoard's own reader, and the page checked in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import helpers_train as H

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def real_run(tiny_policy_dir, tmp_path_factory):
    """Metrics files written by the real commands on the tiny model."""
    d = tmp_path_factory.mktemp("run")
    batch = H.write_batch(tiny_policy_dir, d / "batch.jsonl", [1.0, -1.0, 0.5, -0.5], image_dir=d)
    tb = d / "tb"
    sft = H.Ran(["sft", batch, "--policy", tiny_policy_dir, "--out", d / "sft", "--epochs", "2", "--lr", "3e-3",
                 "--batch-size", "2", "--micro-batch-tokens", "300", "--report-to", "tensorboard",
                 "--logging-dir", d / "tb-sft"])
    assert sft.exit_code == 0, sft.stderr
    (d / "sft.jsonl").write_text(sft.stdout)
    lines, policy = [], d / "sft"
    (d / "rl.yaml").write_text(f"lr: 1e-3\nbeta: 1e-3\nmicro-batch-tokens: 300\nref: {d / 'sft'}\n")
    for step in (1, 2):
        out = d / f"rl-{step}"
        # step 1 from flags, step 2 from the config file: the same settings
        how = (["--lr", "1e-3", "--ref", d / "sft", "--beta", "1e-3", "--micro-batch-tokens", "300"] if step == 1
               else ["--config", d / "rl.yaml"])
        r = H.Ran(["update", batch, "--policy", policy, "--out", out, *how,
                   "--report-to", "tensorboard", "--logging-dir", tb])
        assert r.exit_code == 0, r.stderr
        lines.append(r.stdout)
        e = H.Ran(["eval", batch, "-q", "--label", f"step-{step}", "--report-to", "tensorboard",
                   "--logging-dir", tb, "--step", str(step)])
        assert e.exit_code == 0, e.stderr
        lines.append(e.stdout)
        policy = out
    (d / "rl.jsonl").write_text("".join(lines))
    return d


def test_update_and_sft_write_their_settings_beside_the_checkpoint(real_run):
    s = json.loads((real_run / "rl-2" / "mars_settings.json").read_text())
    assert s["command"] == "update" and s["settings"]["lr"] == 1e-3 and s["sources"]["lr"] == "config"
    assert s["config"] == str(real_run / "rl.yaml") and s["sources"]["report_to"] == "flag"
    assert s["sources"]["weight_decay"] == "default" and s["settings"]["report_to"] == "tensorboard"
    assert s["settings"]["policy"] == str(real_run / "rl-1")
    first = json.loads((real_run / "rl-1" / "mars_settings.json").read_text())
    assert first["sources"]["lr"] == "flag" and first["config"] is None
    same = {k: v for k, v in first["settings"].items() if k not in ("policy", "out")}
    assert same == {k: v for k, v in s["settings"].items() if k not in ("policy", "out")}
    sft = json.loads((real_run / "sft" / "mars_settings.json").read_text())
    assert sft["command"] == "sft" and sft["settings"]["epochs"] == 2


def test_tensorboard_events_load_in_tensorboards_reader(real_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(real_run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    rl = [json.loads(x) for x in (real_run / "rl.jsonl").read_text().splitlines()]
    updates = [r for r in rl if r["kind"] == "update"]
    gn = acc.Scalars("train/grad_norm")
    assert [e.step for e in gn] == [r["step"] for r in updates]
    assert [e.value for e in gn] == pytest.approx([r["grad_norm"] for r in updates], rel=1e-6)
    assert "train/clip_fraction" in tags and "train/logprob_gap/tokens" in tags
    p1 = acc.Scalars("eval/unknown/pass_1")  # TensorBoard tags allow no "@"
    assert [e.step for e in p1] == [1, 2] and p1[0].value == pytest.approx(1.0)
    sft = EventAccumulator(str(real_run / "tb-sft"))
    sft.Reload()
    nll = [json.loads(x)["train_nll"] for x in (real_run / "sft.jsonl").read_text().splitlines()]
    assert [e.value for e in sft.Scalars("train/train_nll")] == pytest.approx(nll, rel=1e-6)


def test_plot_draws_the_run_as_png_and_html(real_run, tmp_path):
    from PIL import Image

    r = H.Ran(["plot", real_run / "rl.jsonl", real_run / "sft.jsonl", "-o", tmp_path / "run.png"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["runs"] == ["rl", "sft"]
    for panel in ("grad norm", "KL", "clip fraction", "step time (s)", "SFT NLL", "eval pass@1", "eval format rate"):
        assert panel in summary["panels"]
    assert "staleness" not in summary["panels"]  # no record carries it: left out, not drawn empty
    with Image.open(tmp_path / "run.png") as im:
        assert im.width > 800 and im.height > 600
        assert len(im.convert("RGB").getcolors(1 << 24)) > 20  # lines and text, not a blank canvas
    r = H.Ran(["plot", real_run / "rl.jsonl", real_run / "sft.jsonl", "-o", tmp_path / "run.html"])
    assert r.exit_code == 0, r.stderr
    page = (tmp_path / "run.html").read_text()
    # self-contained: nothing fetched (xmlns URIs are names, not loads)
    assert "<script" not in page and "<link" not in page and not re.search(r'(src|href)="(https?:)?//', page)
    assert page.count("<svg") == len(json.loads(r.stdout)["panels"])


def test_missing_fields_are_skipped_and_eval_points_follow_file_order(tmp_path):
    from mars_cli.plot import load_runs, panels

    f = tmp_path / "m.jsonl"
    recs = [{"kind": "update", "step": 1, "grad_norm": 0.5}, {"kind": "update", "step": 2, "kl": 0.1},
            {"kind": "update", "step": 3, "grad_norm": 0.25, "staleness": 1},
            {"kind": "metrics", "benchmark": "vstar", "label": "base", "by": None, "pass@1": 0.2},
            {"kind": "metrics", "benchmark": "vstar", "label": "base", "by": "category", "subset": "x", "pass@1": 0.9},
            {"kind": "metrics", "benchmark": "hrbench", "label": "rl-10", "by": None, "pass@1": 0.4},
            {"kind": "metrics", "benchmark": "vstar", "label": "rl-10", "by": None, "pass@1": 0.3}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ps = {p.title: p for p in panels(load_runs([str(f)]))}
    assert ps["grad norm"].series == [("m", [1.0, 3.0], [0.5, 0.25])]
    assert ps["KL"].series == [("m", [2.0], [0.1])]
    assert ps["staleness"].series == [("m", [3.0], [1.0])]
    ev = ps["eval pass@1"]
    assert ev.categories == ["base", "rl-10"]
    assert ev.series == [("vstar", [0, 1], [0.2, 0.3]), ("hrbench", [1], [0.4])]  # the --by subset is not a point


def test_plot_errors(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"kind": "judge", "reward": 1}\n')
    r = H.Ran(["plot", f, "-o", tmp_path / "p.html"])
    assert r.exit_code == 1 and "no metrics records to plot" in r.stderr
    g = tmp_path / "g.jsonl"
    g.write_text('{"kind": "update", "step": 1, "grad_norm": 1}\n')
    r = H.Ran(["plot", g, "-o", tmp_path / "p.svgz"])
    assert r.exit_code == 1 and "use .html or .png" in r.stderr and not (tmp_path / "p.svgz").exists()


@pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None,
                    reason="headless check needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(real_run, tmp_path):
    page = tmp_path / "run.html"
    r = H.Ran(["plot", real_run / "rl.jsonl", real_run / "sft.jsonl", "-o", page])
    assert r.exit_code == 0, r.stderr
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
           f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<figure") == len(json.loads(r.stdout)["panels"]) and dom.count("<svg") >= dom.count("<figure")
    assert "grad norm" in dom and "eval pass@1" in dom and "training step" in dom  # evals labelled step-N stand at N
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
                    f"--user-data-dir={tmp_path / 'chromium2'}", "--window-size=1400,1200",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        assert len(im.convert("RGB").getcolors(1 << 24)) > 30  # drawn, not blank


def _records(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_r12_extreme_values_are_drawn_at_the_edge_with_a_note(tmp_path):
    from mars_cli.plot import load_runs, panels

    f = _records(tmp_path / "m.jsonl", [{"kind": "update", "step": 1, "loss": 0.5, "kl": 0.01},
                                        {"kind": "update", "step": 2, "loss": 1e308, "kl": -1e308},
                                        {"kind": "update", "step": 3, "loss": 0.25, "kl": 0.02}])
    for out in ("p.png", "p.html"):
        r = H.Ran(["plot", f, "-o", tmp_path / out])
        assert r.exit_code == 0, r.stderr
        assert "loss: 1 off scale (up to 1e+308), drawn at the edge" in r.stderr
        assert "KL: 1 off scale (up to -1e+308)" in r.stderr
    assert "off scale" in (tmp_path / "p.html").read_text()
    ps = {p.title: p for p in panels(load_runs([str(f)]))}
    assert ps["loss"].series == [("m", [1.0, 2.0, 3.0], [0.5, 1e308, 0.25])]  # the data is kept, only drawn clipped
    assert ps["loss"].off_scale == 1 and ps["grad norm" if "grad norm" in ps else "loss"].bound < 1e308


def test_rate_axes_run_0_to_1_and_pass1_shows_n_and_its_interval(tmp_path):
    from mars_cli.plot import _draw, _pyplot, load_runs, panels, wilson

    f = _records(tmp_path / "m.jsonl", [
        {"kind": "update", "step": 1, "accuracy": 0.185, "grad_norm": 2.0},
        {"kind": "update", "step": 2, "accuracy": 0.215, "grad_norm": 3.0},
        {"kind": "metrics", "benchmark": "vstar", "label": "rl-1", "by": None, "pass@1": 0.2, "judged": 200},
        {"kind": "metrics", "benchmark": "vstar", "label": "rl-2", "by": None, "pass@1": 0.21, "judged": 200}])
    ps = {p.title: p for p in panels(load_runs([str(f)]))}
    plt = _pyplot()
    for title, rate in (("accuracy", True), ("eval pass@1", True), ("grad norm", False)):
        fig, ax = plt.subplots()
        _draw(ax, ps[title])
        lo, hi = ax.get_ylim()
        plt.close(fig)
        assert ((lo, hi) == (-0.03, 1.03)) == rate, (title, lo, hi)
    ev = ps["eval pass@1"]
    assert ev.series[0][0] == "vstar (n=200)" and "95% interval" in ev.note
    lo, hi = ev.intervals[0][0]
    assert wilson(0.2, 200) == (lo, hi) and lo == pytest.approx(0.1505, abs=1e-3) and hi == pytest.approx(0.2609, abs=1e-3)  # by hand


def test_evals_stand_on_the_training_step_their_label_names(tmp_path):
    from mars_cli.plot import eval_step, load_runs, panels

    f = _records(tmp_path / "m.jsonl", [
        {"kind": "update", "step": 8, "grad_norm": 1.0}, {"kind": "update", "step": 16, "grad_norm": 1.0},
        {"kind": "metrics", "benchmark": "vstar", "label": "rl-16", "by": None, "pass@1": 0.4},
        {"kind": "metrics", "benchmark": "vstar", "label": "step_8", "by": None, "pass@1": 0.3}])
    ev = {p.title: p for p in panels(load_runs([str(f)]))}["eval pass@1"]
    assert ev.xlabel == "training step" and ev.categories is None and ev.section == "eval"
    assert ev.series == [("vstar", [16.0, 8.0], [0.4, 0.3])]
    assert [eval_step({"label": x}) for x in ("rl-16", "step16", "16", "v2", "base", "qwen2.5-7b")] == \
        [16.0, 16.0, 16.0, None, None, None]
    assert eval_step({"label": "base", "step": 0}) == 0.0


def test_mars_eval_step_puts_the_demos_labels_on_the_training_step(tmp_path):
    """sft / rl-16 / rl name no step between them; `mars eval --step` writes it in the record."""
    from mars_cli.plot import load_runs, panels

    rec = {"schema_version": 1, "id": "t", "question": "q", "answers": ["a"], "group": "t", "sample": 0,
           "prediction": "a", "finish": "answer", "rewards": {"accuracy": 1.0, "format": 1.0}, "reward": 1.0,
           "messages": [{"role": "assistant", "content": "<answer>a</answer>"}], "tool_calls": [], "tokens": None}
    judged = _records(tmp_path / "judged.jsonl", [rec])
    out = tmp_path / "metrics.jsonl"
    for label, step in (("sft", 0), ("rl-16", 16), ("rl", 32)):
        r = H.Ran(["eval", judged, "--label", label, "--step", step, "-q"])
        assert r.exit_code == 0, r.stderr
        with out.open("a") as f:
            f.write(r.stdout)
    assert [json.loads(x)["step"] for x in out.read_text().splitlines() if json.loads(x).get("by") is None] == [0, 16, 32]
    ev = {p.title: p for p in panels(load_runs([str(out)]))}["eval pass@1"]
    assert ev.xlabel == "training step" and ev.categories is None and ev.series[0][1] == [0.0, 16.0, 32.0]


def test_sft_step_time_is_seconds_per_step(tmp_path):
    from mars_cli.plot import load_runs, panels

    f = _records(tmp_path / "sft.jsonl", [{"kind": "sft", "epoch": 1, "steps": 4, "seconds": 8.0, "train_nll": 2.0},
                                          {"kind": "sft", "epoch": 2, "steps": 12, "seconds": 12.0, "train_nll": 1.5}])
    p = {p.title: p for p in panels(load_runs([str(f)]))}["step time (s)"]
    assert p.series == [("sft", [4.0, 12.0], [2.0, 1.5])]


def test_a_resumed_runs_log_has_one_point_per_step_from_the_weights_kept(tmp_path):
    """`update --follow` killed after step 3 (saved at 2), restarted with its log appended: the
    restart prints step 2's record again (`recovered`) and retrains step 3; each step is drawn
    once, with the values of the run whose weights were kept."""
    from mars_cli.plot import load_runs, panels

    f = _records(tmp_path / "m.jsonl", [
        {"kind": "update", "step": 1, "loss": 1.0}, {"kind": "update", "step": 2, "loss": 0.9},
        {"kind": "update", "step": 3, "loss": 0.8},
        {"kind": "update", "step": 2, "loss": 0.9, "recovered": "printed on resume"},
        {"kind": "update", "step": 3, "loss": 0.7}, {"kind": "update", "step": 4, "loss": 0.6},
        {"kind": "sft", "epoch": 1, "steps": 2, "train_nll": 2.0}])
    ps = {p.title: p for p in panels(load_runs([str(f)]))}
    assert ps["loss"].series == [("m", [1.0, 2.0, 3.0, 4.0], [1.0, 0.9, 0.7, 0.6])]
