"""streams.progress: a bar on a terminal, periodic plain lines in a log, a summary at the end."""

from __future__ import annotations

import re

import pytest

from mars_cli import streams
from mars_cli import progress
from mars_cli.progress import LogProgress, duration


@pytest.fixture(autouse=True)
def fresh_rate_units(monkeypatch):
    monkeypatch.setattr(progress, "_PER_ITEM", {})  # each test chooses its units afresh


def test_log_mode_prints_periodic_lines_with_total_rate_eta(monkeypatch, capsys):
    monkeypatch.setenv("MARS_PROGRESS", "log")
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "0")
    token = streams.program.set("mars judge")
    try:
        bar = streams.progress(desc="judge", unit="rec", total=4)
        assert isinstance(bar, LogProgress)
        for _ in range(4):
            bar.update(1)
        bar.set_postfix({"answer": 3, "error": 1})
        bar.close()
        bar.close()  # idempotent: one summary
    finally:
        streams.program.reset(token)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5
    # the description is left out where it only repeats the command's name
    assert lines[0].startswith("mars judge: 1/4 rec (25%), ") and "ETA " in lines[0]
    assert lines[3].startswith("mars judge: 4/4 rec (100%)") and "ETA 0.0s" in lines[3]
    assert re.fullmatch(r"mars judge: 4 rec in [0-9.]+s \(.+\); answer 3, error 1", lines[4])


def test_interval_throttles_lines(monkeypatch, capsys):
    monkeypatch.setenv("MARS_PROGRESS", "log")
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "3600")
    for _ in streams.progress(range(1000), desc="work", unit="items"):
        pass
    err = capsys.readouterr().err.splitlines()
    # nothing periodic within the hour; the iterable's length is the total; one summary at the end
    assert len(err) == 1 and re.fullmatch(r"mars: work: 1000 items in [0-9.]+s \(.+\)", err[0])


def test_no_summary_when_the_reader_went_away(monkeypatch, capsys):
    monkeypatch.setenv("MARS_PROGRESS", "log")
    it = iter(streams.progress(range(10), desc="judge"))
    next(it)
    it.close()  # the consumer stopped (BrokenPipe, an error): no "done" line
    with pytest.raises(ValueError):
        with streams.progress(total=3, desc="x") as bar:
            bar.update(1)
            raise ValueError
    assert capsys.readouterr().err == ""


def test_summary_false_leaves_the_end_to_the_caller(monkeypatch, capsys):
    monkeypatch.setenv("MARS_PROGRESS", "log")
    bar = streams.progress(desc="rollout", unit="episode", summary=False)
    bar.update(3)
    bar.close()
    streams.summary("3 episodes: answer 3")
    assert capsys.readouterr().err == "mars: 3 episodes: answer 3\n"


def test_off_terminal_is_log_by_default_and_zero_silences(monkeypatch, capsys):
    monkeypatch.delenv("MARS_PROGRESS", raising=False)
    assert streams.progress_mode() == "log"  # pytest's stderr is not a terminal
    monkeypatch.setenv("MARS_PROGRESS", "0")
    bar = streams.progress(total=3, desc="x")
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""
    assert not streams.progress_enabled()


def test_terminal_gets_a_tqdm_bar_with_total(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setenv("MARS_PROGRESS", "bar")
    bar = streams.progress(total=10, desc="x", summary=True)
    assert isinstance(bar, tqdm) and bar.total == 10 and not bar.disable
    bar.close()


@pytest.mark.parametrize("secs,text", [(4.25, "4.2s"), (123, "2m03s"), (3720, "1h02m")])
def test_duration(secs, text):
    assert duration(secs) == text


def test_slow_work_shows_seconds_per_unit(monkeypatch):
    bar = LogProgress(total=10, unit="episodes", desc="rollout", interval=1e9)
    bar.start -= 40
    bar.n = 2
    line = bar.line(bar.start + 40)
    assert "20 s/episode" in line and "ETA 2m40s" in line and "2/10 episodes (20%)" in line


def test_index_progress_moves_per_encoder_batch_not_per_chunk(tmp_path, monkeypatch, capsys):
    """A dense build reports while it embeds, with the corpus size as the total."""
    import numpy as np

    from mars_cli.tools.index_text import build_text_index

    class Embedder:
        """Reports its own progress (as the real encoder does: every 8 length-sorted batches)."""
        reports_progress = True
        calls = []

        def encode(self, items, kind="passage", on_progress=None):
            self.calls.append(len(items))
            for s in range(0, len(items), 256):
                on_progress(min(256, len(items) - s))
            return np.ones((len(items), 4), dtype=np.float32)

    monkeypatch.setenv("MARS_PROGRESS", "log")
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "0")
    passages = ({"id": str(i), "title": f"t{i}", "text": f"word{i} common"} for i in range(600))
    emb = Embedder()
    build_text_index(passages, tmp_path / "idx", embedder=emb, chunk=20_000, total=600)
    lines = capsys.readouterr().err.splitlines()
    assert emb.calls == [600]  # the whole chunk at once: length-sorted batches across all of it
    assert [ln.split(" (")[0] for ln in lines[:3]] == ["mars: index 256/600 passages", "mars: index 512/600 passages",
                                                       "mars: index 600/600 passages"]
    assert lines[-1].startswith("mars: index: 600 passages in ")


def test_count_lines(tmp_path):
    from mars_cli.progress import count_lines

    (tmp_path / "a").write_bytes(b"x\ny\n")
    (tmp_path / "b").write_bytes(b"z")  # no final newline: still a line
    assert count_lines([tmp_path / "a", tmp_path / "b"]) == 3
    assert count_lines(None) is None and count_lines([tmp_path / "missing"]) is None


def test_judge_cli_off_a_terminal_ends_with_a_summary(tmp_path):
    import json

    from clirun import Ran

    rec = {"schema_version": 1, "id": "t", "group": "t", "sample": 0, "question": "q", "answers": ["Paris"],
           "scorer": "em", "messages": [], "prediction": "Paris", "finish": "answer", "tool_calls": []}
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(dict(rec, sample=i)) for i in range(3)) + "\n")
    r = Ran(["judge", f], env={"MARS_PROGRESS": None, "MARS_PROGRESS_INTERVAL": "0"})
    assert r.exit_code == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("mars judge: 1/3 records (33%)") and "ETA" in lines[0]
    assert lines[-1].startswith("mars judge: 3 records in ")


def test_minor_bad_progress_interval_is_a_usage_error(tmp_path):
    from clirun import Ran

    f = tmp_path / "t.jsonl"
    f.write_text('{"schema_version": 1, "id": "t", "group": "t", "sample": 0, "question": "q", "answers": ["P"], '
                 '"scorer": "em", "messages": [], "prediction": "P", "finish": "answer", "tool_calls": []}\n')
    r = Ran(["judge", f], env={"MARS_PROGRESS": "log", "MARS_PROGRESS_INTERVAL": "soon"})
    assert r.exit_code == 2 and "MARS_PROGRESS_INTERVAL must be a number >= 0, got 'soon'" in r.stderr


def test_summary_says_one_step_not_one_steps():
    from mars_cli.progress import LogProgress

    one = LogProgress(None, unit="steps", summary=False)
    one.update(1)
    assert " 1 step in " in " " + one.final_line(one.start + 2.0)
    two = LogProgress(None, unit="steps", summary=False)
    two.update(2)
    assert " 2 steps in " in " " + two.final_line(two.start + 2.0)


def test_minor_one_rate_unit_per_run():
    """update --follow printed "2.8 s/step", then "1.25 steps/s": the unit now stays as first chosen."""
    from mars_cli.progress import _rate

    assert [_rate(1, t, "steps") for t in (2.8, 0.8, 2.0)] == ["2.8 s/step", "0.8 s/step", "2 s/step"]
    assert [_rate(n, 1.0, "records") for n in (5, 0.5, 300)] == ["5 records/s", "0.5 records/s", "300 records/s"]
    bar = LogProgress(None, unit="steps", summary=False)
    bar.update(1)
    assert bar.final_line(bar.start + 0.5).endswith("(0.5 s/step)")


def test_a_stage_waiting_for_input_says_so_and_its_rate_counts_busy_time(monkeypatch, capsys):
    """judge behind a slow rollout: 2 records, each read after 60 s and judged in 1 s."""
    from mars_cli import progress

    now = [1000.0]
    monkeypatch.setattr(progress, "_clock", lambda: now[0])
    monkeypatch.setattr(progress, "_PER_ITEM", {})  # each unit's rate style starts fresh
    monkeypatch.setattr(progress, "_INPUT", progress._Input())
    monkeypatch.setenv("MARS_PROGRESS", "log")
    token = streams.program.set("mars judge")

    def slow_pipe():  # what a blocked read looks like to progress.reading
        for line in (b"a\n", b"b\n"):
            now[0] += 60
            yield line

    try:
        bar = streams.progress(desc="judge", unit="records", per_input=True, interval=1e9)
        lines = []
        for _ in progress.reading(slow_pipe()):
            progress.arrived()
            now[0] += 1  # judging it
            bar.update(1)
            progress._INPUT.blocked_since = now[0]  # the next read starts
            now[0] += 30
            lines.append(bar.line(now[0]))
            now[0] -= 30
        progress._INPUT.blocked_since = None
        bar.close()
    finally:
        streams.program.reset(token)
    assert lines[0] == "waiting for input (30.0s), 1 records in 1m31s, 1 records/s busy"
    final = capsys.readouterr().err.splitlines()[-1]
    # 2 records in 122 s of which 2 s busy: 1 record/s, not 61 s/record
    assert final == "mars judge: 2 records in 2m02s (1 records/s busy; 2m00s waiting for input)"
    assert not progress._INPUT.counting and not progress._INPUT.arrivals
    idle = LogProgress(desc="x", unit="records", per_input=True, interval=1e9)
    progress._INPUT.blocked_since = now[0]
    now[0] += 60
    assert idle.line(now[0]) == "x waiting for input (1m00s), 0 records in 1m00s"
    progress._INPUT.blocked_since = None
    idle.close()


def test_a_line_comes_while_nothing_finishes_and_stops_with_the_bar(monkeypatch, capsys):
    import time

    from mars_cli import progress

    now = [0.0]
    monkeypatch.setattr(progress, "_clock", lambda: now[0])
    monkeypatch.setattr(progress, "_PER_ITEM", {})
    bar = LogProgress(desc="work", unit="records", interval=1)
    now[0] = 61.0
    seen = ""
    deadline = time.monotonic() + 20
    while "elapsed 1m01s" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen += capsys.readouterr().err
    assert "mars: work 0 records, - records/s, elapsed 1m01s" in seen
    bar.close()
    now[0] = 200.0
    time.sleep(0.6)
    assert "elapsed" not in capsys.readouterr().err  # closed: no more periodic lines


def test_a_bar_ended_by_an_error_or_abandoned_stops_counting_input(monkeypatch):
    """A command that fails mid-stream (in-process, as `mars ask` and the tests run them)
    must not leave its bar counting arrivals: the next bar's busy time would be wrong."""
    from mars_cli import progress

    monkeypatch.setattr(progress, "_INPUT", progress._Input())
    monkeypatch.setenv("MARS_PROGRESS", "log")
    try:
        with LogProgress(desc="x", unit="records", per_input=True, interval=1e9):
            progress.arrived()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert progress._INPUT.counting == 0 and not progress._INPUT.arrivals
    bar = LogProgress(iter(range(5)), desc="y", unit="records", per_input=True, interval=1e9)
    for i in bar:
        progress.arrived()
        if i == 1:
            break
    del i
    it = iter(bar)  # an abandoned generator is closed when dropped
    next(it)
    it.close()
    assert progress._INPUT.counting == 0 and not progress._INPUT.arrivals
