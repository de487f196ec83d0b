"""Load a written checkpoint into running `mars serve` servers, and confirm it took.

For each server, at once: read /health (the weight version before), POST /load
{"path": checkpoint}, then read /health again until it shows the checkpoint's
fingerprint at a higher weight version. Returns one dict per server; any failure raises
PushError naming every server that failed and why (the others keep the new weights).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from mars_cli.errors import MarsError


class PushError(MarsError):
    """One or more servers did not load the checkpoint."""


def push_checkpoint(urls: list[str], checkpoint: str, *, fingerprint: str | None = None,
                    api_key: str | None = None, timeout: float = 900.0) -> list[dict]:
    """Have every server in `urls` load `checkpoint`; [{url, fingerprint, weight_version, seconds}]."""
    from mars_cli.models.load import fingerprint as fingerprint_of

    if not urls:
        raise MarsError("no server to push to")
    path = str(Path(checkpoint).resolve())
    fp = fingerprint or fingerprint_of(path)
    api_key = api_key or os.environ.get("MARS_SERVE_API_KEY") or None
    results = asyncio.run(_push_all([u.rstrip("/") for u in urls], path, fp, api_key, timeout))
    failed = [f"{u}: {r}" for u, r in zip(urls, results) if isinstance(r, str)]
    if failed:
        raise PushError(f"{checkpoint} not loaded by {len(failed)} of {len(urls)} server(s): " + "; ".join(failed))
    return results


async def _push_all(urls, path, fp, api_key, timeout):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)) as client:
        return await asyncio.gather(*(_push_one(client, u, path, fp, timeout) for u in urls))


async def _push_one(client, url: str, path: str, fp: str, timeout: float) -> dict | str:
    import httpx

    t0 = time.monotonic()
    try:
        before = await client.get(url + "/health")
        old = before.json().get("weight_version") if before.status_code in (200, 503) else None
        if not isinstance(old, int):
            return f"/health answered HTTP {before.status_code}: not a mars server, or the API key was refused"
        r = await client.post(url + "/load", json={"path": path})
        if r.status_code != 200:
            return f"load failed (HTTP {r.status_code}): {_message(r)}"
        deadline = t0 + timeout
        while True:
            h = await client.get(url + "/health")
            body = h.json()
            if h.status_code == 200 and body.get("fingerprint") == fp and int(body.get("weight_version", 0)) > old:
                return {"url": url, "fingerprint": fp, "weight_version": int(body["weight_version"]),
                        "seconds": round(time.monotonic() - t0, 3)}
            if h.status_code == 200 and body.get("fingerprint") != fp:
                return (f"/health shows {body.get('fingerprint')} at weight version {body.get('weight_version')}, "
                        f"not {fp} (another load raced this one?)")
            if time.monotonic() > deadline:
                return f"/health still not serving {fp} after {timeout:.0f} s ({body.get('status')})"
            await asyncio.sleep(0.5)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except ValueError as e:
        return f"malformed answer: {e}"


def _message(r) -> str:
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        return r.text[:300]
    return str(err.get("message") if isinstance(err, dict) else err)
