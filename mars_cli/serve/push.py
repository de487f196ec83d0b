"""Load a written checkpoint into running `mars serve` servers, and prove it took.

For each server, at once: read /health (the weight version before), POST /load
{"path": checkpoint}, then read /health again until it shows the checkpoint's
fingerprint at a higher weight version. Then the proof (serve.probe): every server's
/load answer carries its log-probs on a fixed probe, and `reference` (the trainer's
model; by default the checkpoint loaded on the CPU) scores the same tokens, once for
all servers. Returns one dict per server, its `probe` {gap, mean, tokens, bound}
included. A server that did not load raises PushError; one whose gap exceeds the bound
(it reports the checkpoint but serves other weights) raises ProbeError. Both name every
server that failed and why; the others keep the new weights; the checkpoint stays.
Results and errors name a server by its URL without credentials (mars_cli.urls).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from mars_cli.errors import MarsError
from mars_cli.urls import public_url, redact


class PushError(MarsError):
    """One or more servers did not load the checkpoint, or could not prove it."""

    def __init__(self, message: str, results: list | None = None):
        super().__init__(message)
        self.results = results or []  # per server: its result dict, or {url, error}


class ProbeError(PushError):
    """A server loaded the checkpoint but its probe log-probs are not the trainer's."""


def push_checkpoint(urls: list[str], checkpoint: str, *, fingerprint: str | None = None,
                    api_key: str | None = None, timeout: float = 900.0, reference=None,
                    max_gap: float | None = None) -> list[dict]:
    """Have every server in `urls` load `checkpoint`; [{url, fingerprint, weight_version, seconds, probe}].

    `reference(probes) -> [[log-prob, …], …]`: the trainer's log-probs of each probe's
    token_ids (serve.probe.model_reference), called at most once per push; None: the
    checkpoint as written, loaded on the CPU. `max_gap`: the bound (None: MARS_PUSH_MAX_GAP
    or serve.probe.MAX_GAP).
    """
    from mars_cli.models.load import fingerprint as fingerprint_of
    from mars_cli.serve import probe as P

    if not urls:
        raise MarsError("no server to push to")
    path = str(Path(checkpoint).resolve())
    fp = fingerprint or fingerprint_of(path)
    api_key = api_key or os.environ.get("MARS_SERVE_API_KEY") or None
    bound = P.check_max_gap(max_gap) if max_gap is not None else P.max_gap_default()
    urls = [u.rstrip("/") for u in urls]
    results = asyncio.run(_push_all(urls, path, fp, api_key, timeout))
    results = [{**r, "url": public_url(u)} if isinstance(r, dict) else {"url": public_url(u), "error": redact(r)}
               for u, r in zip(urls, results)]
    mismatch = _prove(results, reference or P.checkpoint_reference(path), bound)
    failed = [r for r in results if "error" in r]
    if failed:
        where = (f"{checkpoint} not served as written by" if mismatch else f"{checkpoint} not loaded by")
        message = (f"{where} {len(failed)} of {len(urls)} server(s): "
                   + "; ".join(f"{r['url']}: {r['error']}" for r in failed) + f" (the checkpoint stays at {checkpoint})")
        raise (ProbeError if mismatch else PushError)(redact(message), results)
    return results


def _prove(results: list[dict], reference, bound: float) -> bool:
    """Compare each loaded server's probe with the reference, in place (`probe`, or `error`);
    whether a server's gap was over the bound."""
    from mars_cli.serve import probe as P

    loaded, probes = [], []
    for r in results:
        answer = r.pop("probe", None)
        if "error" not in r:
            why = P.check_answer(answer)
            if why:
                r["error"] = f"loaded, but not proven: {why}"
            else:
                loaded.append(r)
                probes.append(answer)
    if not loaded:
        return False
    try:
        refs = list(reference(probes))
        if len(refs) != len(probes):
            raise MarsError(f"{len(refs)} reference rows for {len(probes)} probes")
        measured = [P.gaps(probe, ref) for probe, ref in zip(probes, refs)]
    except Exception as e:  # the trainer's forward failed: the push is not proven (nor disproven)
        for r in loaded:
            r["error"] = f"loaded, but the trainer could not score its probe: {type(e).__name__}: {e}"
        return False
    mismatch = False
    for r, g in zip(loaded, measured):
        r["probe"] = {**g, "bound": bound}
        if not g["gap"] <= bound:
            mismatch = True
            r["error"] = (f"serves other weights than it reports: its log-probs on the push probe differ from the "
                          f"trainer's by {g['gap']:.3g} (largest of {g['tokens']} tokens; mean {g['mean']:.3g}), "
                          f"over the bound {bound:g} (--push-max-gap)")
    return mismatch


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
        loaded = r.json()
        loaded = loaded if isinstance(loaded, dict) else {}
        deadline = t0 + timeout
        while True:
            h = await client.get(url + "/health")
            body = h.json()
            if h.status_code == 200 and body.get("fingerprint") == fp and int(body.get("weight_version", 0)) > old:
                return {"url": url, "fingerprint": fp, "weight_version": int(body["weight_version"]),
                        "seconds": round(time.monotonic() - t0, 3), "probe": loaded.get("probe")}
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
