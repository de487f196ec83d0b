"""`bench/run --quick` in the suite, one test per benchmark, so the benchmarks cannot rot.

Every benchmark must run: a failure to run (an exception, no figures, a timeout) fails its
test. A missed target is only reported (a BenchTargetMissed warning in the summary): the
figures are timings on whatever machine runs the suite. A benchmark whose packages are
absent (the `bench` extra, see bench/run's NEEDS) is skipped with the install command.
The quick sizes (bench/run's QUICK) keep the whole run near 5½ minutes on 2 cores; one
test per benchmark costs nothing extra (each benchmark is its own process in bench/run too),
and says which one broke.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_RUN = ROOT / "bench" / "run"
# bench/run --timeout, a hang guard only: the longest quick benchmark takes under a minute on
# 2 idle cores and a few on a heavily loaded machine; a hung one fails, a slow one never does.
PER_BENCHMARK_S = 600


def _bench_run():
    loader = importlib.machinery.SourceFileLoader("bench_run", str(BENCH_RUN))
    spec = importlib.util.spec_from_loader("bench_run", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


BENCH = _bench_run()


class BenchTargetMissed(UserWarning):
    """A benchmark ran but a figure missed its target (reported, not a failure)."""


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCH.ORDER)
def test_bench_quick_runs(name, tmp_path):
    why = BENCH.missing(name) or BENCH.NOT_IN_SUITE.get(name)
    if why:
        pytest.skip(f"bench/run: {name} {why}")
    out = tmp_path / "figures.json"
    p = subprocess.run([sys.executable, str(BENCH_RUN), "--quick", "--only", name, "--json", str(out),
                        "--timeout", str(PER_BENCHMARK_S)],
                       cwd=ROOT, capture_output=True, text=True, timeout=PER_BENCHMARK_S + 120)
    [res] = json.loads(out.read_text())["results"]
    assert "error" not in res, f"bench/{name}.py failed to run: {res['error']}\n{p.stderr[-4000:]}"
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert res["rows"] and any(row["value"] is not None for row in res["rows"]), res
    missed = [f"{row['measure']} {row['value']} (target {row['target']})" for row in res["rows"] if row["result"] == "MISS"]
    if missed:
        warnings.warn(BenchTargetMissed(f"bench {name}: {len(missed)} target(s) missed: " + "; ".join(missed)))


def test_bench_run_names_what_a_skipped_benchmark_needs(monkeypatch):
    monkeypatch.setitem(BENCH.NEEDS, "crop", (("no_such_module_for_mars_bench",), "the bench extra"))
    res = BENCH.run_one("crop", [], timeout=5)
    assert res["skipped"].startswith("needs the bench extra (no_such_module_for_mars_bench missing): ")
    assert "pip install -e '.[bench]'" in res["skipped"]
    table = BENCH.table([res])
    assert "SKIPPED" in table and "no_such_module_for_mars_bench" in table
    assert "retrieval (needs the bench extra" in subprocess.run([sys.executable, str(BENCH_RUN), "--help"],
                                                                capture_output=True, text=True, timeout=60).stdout
