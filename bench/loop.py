"""Benchmark the RL loop: the per-step shell loop against the resident pipeline.

    .venv/bin/python bench/loop.py [--steps 4] [--groups 8] [--samples 4] [--only shell trainer pipeline]

A tiny policy (4 layers, 8k vocabulary) on the offline synthetic benchmark, G groups × n
samples = episodes per step, the same tasks and seeds in every design:

  shell     today's loop, one set of processes per step:
              mars rollout --policy ck_k | mars judge | mars advantage > batch_k
              mars update batch_k --policy ck_k --out ck_k+1 --state opt
  trainer   the update side alone: each batch the shell loop made is written, right
            after the shell's `mars update` of it, into ONE resident `mars update --follow`
            (side by side, step by step, so load on a shared machine hits both alike)
  pipeline  the resident design end to end (needs `mars serve` and `rollout --server --loop`):
              mars serve --engine hf &
              mars rollout --server $S --loop --group-order | mars judge
                | mars advantage --batch-groups G --group-size n
                | mars update --follow --push $S --max-steps N

Every mars process runs under a tracing launcher (this script with --traced) that logs
the wall-clock intervals in which an engine generates (hf `generate`/`agenerate`, in
rollout or in the server) and in which the trainer computes (`rl.update.train_step`).
Per step: wall time; overhead = 1 − |union(generating, training)| / wall, the share of
the step spent on neither (process starts, model loads, checkpoint writes, pipes);
bytes written (batch files, checkpoints, optimizer state). Step windows of the resident
designs end when update's metrics record for the step arrives. Steady state = steps 2..N
(the first pays the start-up once). Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


# --- the tracing launcher --------------------------------------------------------------------

def traced_main(trace: str, argv: list[str]) -> None:
    """Run `mars ARGV`, logging generate / train_step intervals to `trace`."""
    import asyncio
    import functools

    fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(kind, t0):
        os.write(fd, f"{kind} {t0:.6f} {time.time():.6f}\n".encode())

    def wrap(owner, name, kind):
        f = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if f is None:
            return
        if asyncio.iscoroutinefunction(f):
            @functools.wraps(f)
            async def w(*a, **k):
                t0 = time.time()
                try:
                    return await f(*a, **k)
                finally:
                    log(kind, t0)
        else:
            @functools.wraps(f)
            def w(*a, **k):
                t0 = time.time()
                try:
                    return f(*a, **k)
                finally:
                    log(kind, t0)
        setattr(owner, name, w)

    from mars_cli.engines import hf
    from mars_cli.rl import update

    wrap(hf.HFEngine, "generate", "gen")
    wrap(hf.HFEngine, "agenerate", "gen")
    wrap(update, "train_step", "train")
    from mars_cli.main import run

    sys.argv = ["mars", *argv]
    run(argv)


def read_trace(path: Path) -> list[tuple[str, float, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        k, a, b = line.split()
        out.append((k, float(a), float(b)))
    return out


def covered(intervals, lo: float, hi: float) -> float:
    """Length of the union of `intervals` inside [lo, hi]."""
    spans = sorted((max(a, lo), min(b, hi)) for _, a, b in intervals if b > lo and a < hi)
    total, end = 0.0, lo
    for a, b in spans:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- the designs ---------------------------------------------------------------------------

class Bench:
    def __init__(self, a, work: Path):
        self.a, self.w = a, work
        self.trace = work / "trace.txt"
        self.py = sys.executable
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "MARS_PROGRESS": "0"}

    def mars(self, *args) -> str:
        """A traced `mars` command line."""
        return " ".join(shlex.quote(x) for x in [self.py, str(HERE), "--traced", str(self.trace), "--", *map(str, args)])

    def sh(self, cmd: str, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=self.env, capture_output=True, text=True, **kw)
        if p.returncode != 0:
            raise RuntimeError(f"failed ({p.returncode}): {cmd}\n{p.stderr[-3000:]}")
        return p

    def setup(self) -> None:
        a, w = self.a, self.w
        self.sh(f"{self.mars('tiny-model', w / 'policy', '--seed', 0, '--vocab', 8192, '--layers', 4)} > /dev/null")
        n = a.groups * a.steps
        self.sh(f"{self.mars('data', 'synth', '--n', n, '--seed', 0, '--out', w / 'data')} > /dev/null")
        self.sh(f"{self.mars('index', 'text', w / 'data' / 'corpus.jsonl', '--out', w / 'index')} > /dev/null")
        self.tasks = [self._small_images(json.loads(x)) for x in (w / "data" / "tasks.jsonl").read_text().splitlines()]
        self.roll = ["--index", w / "index", "--max-turns", a.max_turns, "--max-new-tokens", a.max_new_tokens,
                     "--max-total-tokens", 4096]
        self.train = ["--lr", "1e-3", "--beta", "0"]

    def _small_images(self, task: dict) -> str:
        """The task with its 4K images scaled down (the loop, not image preprocessing, is measured)."""
        from PIL import Image

        small = []
        for path in task.get("images") or []:
            out = self.w / "small" / Path(path).name
            out.parent.mkdir(exist_ok=True)
            with Image.open(path) as im:
                im.thumbnail((self.a.image_side, self.a.image_side))
                im.save(out)
            small.append(str(out))
        return json.dumps({**task, "images": small}) + "\n"

    def shell(self, resident: bool = False) -> tuple[list[dict], list[dict]]:
        """The shell loop; with `resident`, each batch is also fed, right after the shell's own
        update of it, to one `update --follow` process (side by side, step by step)."""
        a, w = self.a, self.w
        policy, steps, res_steps = w / "policy", [], []
        trainer = None
        if resident:
            cmd = self.mars("update", "--follow", "--policy", w / "policy", "--out", w / "follow-ck", "--keep-last", 1, *self.train)
            trainer = subprocess.Popen(["bash", "-c", "exec " + cmd], env=self.env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=open(w / "follow.err", "w"), text=True)
        for k in range(1, a.steps + 1):
            (w / f"tasks-{k}.jsonl").write_text("".join(self.tasks[(k - 1) * a.groups:k * a.groups]))
            batch, out = w / f"batch-{k}.jsonl", w / f"shell-ck-{k}"
            self.trace.write_text("")
            t0 = time.time()
            self.sh(f"{self.mars('rollout', '--policy', policy, *self.roll, '-n', a.samples, '--seed', k)} "
                    f"< {w / f'tasks-{k}.jsonl'} | {self.mars('judge')} | {self.mars('advantage')} > {batch}")
            t1 = time.time()
            p = self.sh(self.mars("update", batch, "--policy", policy, "--out", out, "--state", w / "shell-opt", *self.train))
            t2 = time.time()
            tr = read_trace(self.trace)
            m = json.loads(p.stdout.splitlines()[-1])
            steps.append({"wall": t2 - t0, "rollout_wall": t1 - t0, "update_wall": t2 - t1,
                          "gen": covered([x for x in tr if x[0] == "gen"], t0, t2),
                          "train": covered([x for x in tr if x[0] == "train"], t0, t2),
                          "busy": covered(tr, t0, t2), "update_seconds": m["seconds"],
                          "bytes": tree_bytes(batch) + tree_bytes(out) + tree_bytes(w / "shell-opt")})
            if k > 1:  # the shell loop keeps every checkpoint; the disk is not what is measured here
                shutil.rmtree(w / f"shell-ck-{k - 1}", ignore_errors=True)
            policy = out
            if trainer is not None:
                t0 = time.time()  # step 1 also waits for the rest of the one-time load
                trainer.stdin.write(batch.read_text())
                trainer.stdin.flush()
                line = trainer.stdout.readline()
                if not line:
                    raise RuntimeError(f"update --follow ended: {(w / 'follow.err').read_text()[-2000:]}")
                m, t1 = json.loads(line), time.time()
                res_steps.append({"wall": t1 - t0, "gen": 0.0, "train": m["train_seconds"], "busy": m["train_seconds"],
                                  "update_seconds": m["seconds"], "bytes": m["bytes_written"]})
        if trainer is not None:
            trainer.stdin.close()
            trainer.wait(timeout=600)
        return steps, res_steps

    def follow(self, cmd: str, t_start: float) -> tuple[list[dict], list[float]]:
        """Run a pipeline ending in `update --follow`; timestamp each metrics record."""
        proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        records, stamps = [], []
        for line in proc.stdout:
            if line.strip():
                stamps.append(time.time())
                records.append(json.loads(line))
        err = proc.stderr.read()
        if proc.wait() != 0:
            raise RuntimeError(f"failed ({proc.returncode}): {cmd}\n{err[-3000:]}")
        refused = [f"step {m.get('step')}: {m['push'].get('error')}" for m in records
                   if isinstance(m.get("push"), dict) and not m["push"].get("ok")]
        if refused:  # the servers kept sampling old weights: not the pipeline this measures
            raise RuntimeError("pushes failed: " + "; ".join(refused)[-3000:])
        return records, [t_start, *stamps]

    def windows(self, records, stamps) -> list[dict]:
        tr = read_trace(self.trace)
        out = []
        for k, m in enumerate(records):
            lo, hi = stamps[k], stamps[k + 1]
            out.append({"wall": hi - lo, "gen": covered([x for x in tr if x[0] == "gen"], lo, hi),
                        "train": covered([x for x in tr if x[0] == "train"], lo, hi), "busy": covered(tr, lo, hi),
                        "update_seconds": m["seconds"], "wait_seconds": m.get("wait_seconds"),
                        "staleness": (m.get("staleness") or {}).get("max"), "bytes": m.get("bytes_written", 0)})
        return out

    def pipeline_available(self) -> str | None:
        serve = subprocess.run([self.py, "-m", "mars_cli", "serve", "--help"], env=self.env, capture_output=True, text=True)
        roll = subprocess.run([self.py, "-m", "mars_cli", "rollout", "--help"], env=self.env, capture_output=True, text=True)
        missing = [x for x, ok in (("mars serve", serve.returncode == 0), ("rollout --server", "--server" in roll.stdout),
                                   ("rollout --loop", "--loop" in roll.stdout)) if not ok]
        return ", ".join(missing) or None

    def pipeline(self) -> list[dict]:
        a, w = self.a, self.w
        (w / "tasks-all.jsonl").write_text("".join(self.tasks))
        self.trace.write_text("")
        log = open(w / "serve.log", "w")
        server = subprocess.Popen([self.py, str(HERE), "--traced", str(self.trace), "--", "serve", "--policy",
                                   str(w / "policy"), "--engine", "hf", "--port", str(a.port)],
                                  env=self.env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        url = f"http://127.0.0.1:{a.port}"
        try:
            self._wait_ready(url)
            t0 = time.time()
            cmd = (f"{self.mars('rollout', '--server', url, *self.roll, '-n', a.samples, '--seed', 1, '--group-order', '--loop', '--batch-groups', a.groups)} "
                   f"< {w / 'tasks-all.jsonl'} | {self.mars('judge')} "
                   f"| {self.mars('advantage', '--batch-groups', a.groups, '--group-size', a.samples)} "
                   f"| {self.mars('update', '--follow', '--policy', w / 'policy', '--out', w / 'pipe-ck', '--keep-last', 1, '--push', url, '--max-steps', a.steps, *self.train)}")
            return self.windows(*self.follow(cmd, t0))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()

    def _wait_ready(self, url: str, timeout: float = 300) -> None:
        import urllib.request

        end = time.time() + timeout
        while time.time() < end:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mars serve at {url} not ready in {timeout} s (see serve.log)")


# --- figures -------------------------------------------------------------------------------

def summary(steps: list[dict]) -> dict:
    steady = steps[1:] or steps

    def med(key, rows=steady):
        vals = [s[key] for s in rows if s.get(key) is not None]
        return statistics.median(vals) if vals else None

    wall = sum(s["wall"] for s in steady)
    return {"step_wall_s": med("wall"), "first_step_wall_s": steps[0]["wall"],
            "overhead": 1 - sum(s["busy"] for s in steady) / wall if wall else None,
            "outside_gen_train_s": med("wall") - (med("busy") or 0.0),
            "gen_s": med("gen"), "train_s": med("train"), "update_s": med("update_seconds"),
            "bytes_per_step": med("bytes"), "steps": steps}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced":
        sep = sys.argv.index("--")
        return traced_main(sys.argv[2], sys.argv[sep + 1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--groups", type=int, default=8, help="tasks per step")
    ap.add_argument("--samples", type=int, default=4, help="samples per task (episodes/step = groups × samples)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--image-side", type=int, default=448, help="task images scaled to fit this square")
    ap.add_argument("--port", type=int, default=18231)
    ap.add_argument("--only", nargs="+", default=["shell", "trainer", "pipeline"], choices=["shell", "trainer", "pipeline"])
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mars-bench-loop-"))
    b = Bench(a, work)
    fig: dict = {"episodes_per_step": a.groups * a.samples, "steps": a.steps}
    try:
        b.setup()
        shell_steps, res_steps = b.shell(resident="trainer" in a.only)
        shell = summary(shell_steps)
        fig["shell"] = shell
        if res_steps:
            tr = summary(res_steps)
            fig["trainer"] = tr
            steady = list(zip(shell_steps, res_steps))[1:] or list(zip(shell_steps, res_steps))
            fig["update_resident_vs_shell"] = statistics.median(r["wall"] / s["update_wall"] for s, r in steady)
            fig["update_restart_cost_s"] = statistics.median(s["update_wall"] - s["train"] for s, _ in steady)
            fig["update_resident_cost_s"] = statistics.median(r["wall"] - r["train"] for _, r in steady)
        if "pipeline" in a.only:
            missing = b.pipeline_available()
            if missing:
                fig["pipeline"] = {"skipped": f"needs {missing}"}
            else:
                pipe = summary(b.pipeline())
                fig["pipeline"] = pipe
                fig["resident_vs_shell_step"] = pipe["step_wall_s"] / shell["step_wall_s"]
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder: {work}", file=sys.stderr)
    _table(fig)
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "steps"} if isinstance(v, dict) else v)
                      for k, v in fig.items()}))


def _table(fig: dict) -> None:
    e = sys.stderr
    print(f"RL loop, {fig['episodes_per_step']} episodes/step, {fig['steps']} steps (steady state = steps 2..N, medians)", file=e)
    print(f"{'design':10} {'step s':>8} {'1st s':>7} {'gen s':>7} {'train s':>8} {'outside s':>9} {'overhead':>9} {'MB/step':>8}", file=e)
    for name in ("shell", "trainer", "pipeline"):
        f = fig.get(name)
        if not f:
            continue
        if "skipped" in f:
            print(f"{name:10} skipped: {f['skipped']}", file=e)
            continue
        print(f"{name:10} {f['step_wall_s']:8.2f} {f['first_step_wall_s']:7.2f} {f['gen_s']:7.2f} {f['train_s']:8.2f} "
              f"{f['outside_gen_train_s']:9.2f} {f['overhead']:9.1%} {(f['bytes_per_step'] or 0) / 1e6:8.1f}", file=e)
    if "update_resident_vs_shell" in fig:
        print(f"update side: resident step / shell `mars update` process = {fig['update_resident_vs_shell']:.2f}; "
              f"time outside training per step {fig['update_resident_cost_s']:.2f} s resident vs "
              f"{fig['update_restart_cost_s']:.2f} s restarting", file=e)
    if "resident_vs_shell_step" in fig:
        print(f"resident pipeline step / shell loop step = {fig['resident_vs_shell_step']:.2f} (target <= 0.6); "
              f"pipeline overhead {fig['pipeline']['overhead']:.1%} (target <= 10%)", file=e)


if __name__ == "__main__":
    main()
