"""`mars serve --engine hf` under concurrency and hostile input: nothing lost, no 5xx, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from helpers_rollout import make_image

pytestmark = pytest.mark.network


class Served:
    """A `mars serve` process on the tiny model; its stderr collected for the no-traceback check."""

    def __init__(self, policy, *args, env=None):
        base = {k: v for k, v in os.environ.items() if k != "MARS_SERVE_API_KEY"}
        env = {**base, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "mars_cli", "serve", "--policy", str(policy), "--port", "0",
                                      *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(ln.decode() for ln in self.proc.stderr),
                                        daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(60)
            self._reader.join(10)
            raise AssertionError("mars serve did not start: " + "".join(self.err))
        self.url = json.loads(line)["url"]

    def stop(self, sig=None, timeout=60.0) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return "".join(self.err)


@pytest.fixture(scope="module")
def served(tiny_policy_dir):
    s = Served(tiny_policy_dir)
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.stderr, s.stderr


@pytest.mark.slow
def test_five_rounds_of_48_concurrent_episodes_sharing_a_fresh_image_lose_none(served, tiny_policy_dir, tmp_path):
    from mars_cli.agent.loop import AgentLoop, Limits
    from mars_cli.agent.run import open_toolbox
    from mars_cli.engines import Sampling, open_engine

    eng = open_engine("server", policy=None, sampling=Sampling(temperature=1.0), urls=[served.url])
    loop = AgentLoop(eng, open_toolbox(tmp_path / "art", search_backend="local"), max_inflight=48,
                     limits=Limits(max_turns=1, max_total_tokens=2048, max_new_tokens=2))
    for r in range(5):
        img = make_image(tmp_path / f"round{r}.jpg", size=(64 + 8 * r, 48), color=(10 * r, 90, 200))
        tasks = [{"schema_version": 1, "id": f"r{r}-t{i}", "question": "What colour?", "images": [img],
                  "answers": ["red"]} for i in range(48)]
        recs = loop.run(tasks)
        assert sorted(rec["id"] for rec in recs) == sorted(t["id"] for t in tasks)  # none lost, none twice
        bad = [(rec["id"], rec["finish"], rec.get("error")) for rec in recs if rec["finish"] == "error"]
        assert bad == []
        assert all(sum(rec["tokens"]["mask"]) > 0 for rec in recs)
    st = httpx.get(served.url + "/health").json()["stats"]
    assert st["requests"] >= 5 * 48
