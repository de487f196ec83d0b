"""The trainer's lease on its policy servers: how a rollout learns no new weights will come.

`mars update --follow --push URL` holds a lease on each server while it runs (`Heartbeat`):
every few seconds it POSTs /trainer {"id", "state": "following", "lease": S} ("stalled"
while its last push failed: it needs another batch to train and push again), and once,
when it ends in any way it can act on (--max-steps, the end of its input, bad data,
Ctrl-C, pushes failing again and again), {"id", "state": "done"}. The server keeps the
last call (`TrainerLease`) and /health reports it as `trainer`: null until a trainer has
called, then {"id", "state", "seconds"} where state is "following", "stalled", "done", or
"lost" (no call within the lease: the trainer was killed). A rollout that --max-staleness
holds back for new weights ends when the trainer that was following ends, and goes ahead
while it is stalled (agent/feed.py), so a pipeline ends whatever sits between its stages
(`tee` learns that its reader is gone only when it next writes) and never waits on a
push that failed.

Concurrency: the server's state is written by the /trainer route only, on its event loop;
the heartbeat is one daemon thread of the trainer's rank 0, stopped by `close()`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from mars_cli.serve.http import HTTPError, Request

log = logging.getLogger("mars.serve")

LEASE = 20.0  # seconds without a call before a following trainer counts as lost
STATES = ("following", "stalled", "done")


class TrainerLease:
    """Server side: the last /trainer call, reported in /health."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._id: str | None = None
        self._state = "done"
        self._lease = LEASE
        self._seen = 0.0

    def describe(self) -> dict | None:
        if self._id is None:
            return None
        age = self._clock() - self._seen
        state = "lost" if self._state != "done" and age > self._lease else self._state
        return {"id": self._id, "state": state, "seconds": round(age, 3)}

    async def post(self, req: Request):
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        tid, state, lease = body.get("id"), body.get("state"), body.get("lease", LEASE)
        if not isinstance(tid, str) or not 0 < len(tid) <= 64:
            raise HTTPError(400, "id: a string of 1 to 64 characters naming the trainer is required")
        if state not in STATES:
            raise HTTPError(400, f"state must be one of {', '.join(STATES)}")
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 1 <= lease <= 3600:
            raise HTTPError(400, "lease: seconds between 1 and 3600")
        if (tid, state) != (self._id, self._state):
            log.info("trainer %s: %s", tid, state)
        self._id, self._state, self._lease, self._seen = tid, state, float(lease), self._clock()
        return 200, self.describe()


class Heartbeat:
    """Trainer side: hold the lease on `urls` until `close()`, which says "done".

    Calls that fail (a server restarting, a refused key) are logged at debug level and
    retried at the next beat: the lease is a courtesy to the rollouts, never a reason for
    the trainer to stop.
    """

    def __init__(self, urls: list[str], *, api_key: str | None = None, lease: float = LEASE):
        import httpx

        self.urls = [u.rstrip("/") for u in urls]
        self.id = uuid.uuid4().hex[:16]
        self.lease = lease
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(5.0))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.state = "following"
        self._beat("following")
        self._thread = threading.Thread(target=self._run, name="trainer-lease", daemon=True)
        self._thread.start()

    def _beat(self, state: str) -> None:
        import httpx

        with self._lock:
            for url in self.urls:
                try:
                    self._client.post(url + "/trainer", json={"id": self.id, "state": state, "lease": self.lease})
                except httpx.HTTPError as e:
                    log.debug("trainer lease on %s: %s", url, e)

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 8):
            self._beat(self.state)

    def pushed(self, ok: bool) -> None:
        """After each push: "stalled" while the last one failed (a rollout waiting for those
        weights goes ahead, so that a next step can push again), "following" once one worked."""
        state = "following" if ok else "stalled"
        if state != self.state and not self._stop.is_set():
            self.state = state
            self._beat(state)

    def close(self) -> None:
        """Say "done" to every server (once) and stop beating."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._beat("done")
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
