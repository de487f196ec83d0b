"""`mars serve --engine hf` under concurrency and hostile input: nothing lost, no 5xx, no traceback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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


GEN = "/inference/v1/generate"


def gen_body(sp=None, ids=(1, 2, 3), **kw):
    return {"token_ids": list(ids), "sampling_params": {"max_tokens": 2, **(sp or {})}, **kw}


def one_line_400(r, *words):
    assert r.status_code == 400, (r.status_code, r.text)
    msg = r.json()["error"]["message"]
    assert "\n" not in msg and "Traceback" not in msg and all(w in msg for w in words), msg
    return msg


def hf_app(allow_load, **kw):
    from mars_cli.serve.app import App
    from mars_cli.serve.hf_backend import HFBackend

    backend = HFBackend(max_num_seqs=8, seed=0, **kw)
    return App(backend, allow_load=str(allow_load), max_images=4, max_image_bytes=1 << 20)


@pytest.fixture(scope="module")
def in_proc(tiny_policy_dir):
    """An in-process server on the tiny model with a small context (max_model_len 48)."""
    from mars_cli.serve.run import in_thread

    app = hf_app(tiny_policy_dir.parent, max_model_len=48, max_image_pixels=250_000)
    with in_thread(app, str(tiny_policy_dir)) as url:
        yield url, app


# ------------------------------------------------------------------ R1: bad input is one 400 line


@pytest.mark.parametrize("bias", [[1], {"abc": -200}, {"151655": "x"}, {"151655": 1e308}])
def test_r1_logit_bias_list_is_400(served, bias):
    one_line_400(httpx.post(served.url + GEN, json=gen_body({"logit_bias": bias})), "logit_bias")


def test_r1_stop_token_ids_nested_is_400(served):
    one_line_400(httpx.post(served.url + GEN, json=gen_body({"stop_token_ids": [[1]]})), "stop_token_ids")


@pytest.mark.parametrize("raw", ["1e308", "Infinity", "1e999", "-Infinity", "NaN"])
def test_r1_temperature_overflow_and_infinity_is_400(served, raw):
    body = json.dumps(gen_body()).replace('"max_tokens": 2', f'"max_tokens": 2, "temperature": {raw}')
    one_line_400(httpx.post(served.url + GEN, content=body, headers={"Content-Type": "application/json"}))


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 50_000, b'{"token_ids": [' + b"[" * 5000])
def test_r1_deep_nesting_is_400(served, body):
    one_line_400(httpx.post(served.url + GEN, content=body), "nested")


def test_r1_load_with_nul_is_400(served, tiny_policy_dir):
    one_line_400(httpx.post(served.url + "/load", json={"path": str(tiny_policy_dir) + "\0x"}), "NUL")


def test_r1_no_traceback_is_printed_by_mars_serve(served):
    for body in (b"\xff\xfe", b'{"path": 5}', b"{}", b"[]", b'{"token_ids": [1], "sampling_params": []}'):
        for path in (GEN, "/load", "/pause?mode=x", "/sleep?level=x"):
            assert httpx.post(served.url + path, content=body).status_code < 500, (path, body)
    assert "Traceback" not in served.stderr and " failed: " not in served.stderr, served.stderr


def test_r1_adjacent_image_pads_are_400_not_a_model_error(in_proc):
    url, app = in_proc
    pad = app.backend.image_pad
    body = gen_body(ids=[1, pad, pad, 2], content_parts=[{"type": "image_url", "url": _png(40, 30, seed=s)}
                                                         for s in (1, 2)])
    one_line_400(httpx.post(url + GEN, json=body, timeout=60), "side by side")


def test_r1_a_request_that_breaks_generation_fails_alone_not_its_batch(in_proc, monkeypatch):
    url, app = in_proc
    real = app.backend._generate

    def fragile(items):
        if any(7777 in it.ids for it in items):
            raise RuntimeError("this prompt breaks the model")
        return real(items)

    monkeypatch.setattr(app.backend, "_generate", fragile)

    async def batch():
        async with httpx.AsyncClient(timeout=120) as c:
            assert (await c.post(url + "/pause", params={"mode": "keep"})).status_code == 200
            sent = [asyncio.ensure_future(c.post(url + GEN, json=gen_body(ids=[1, 2, 7777 if i == 2 else 3])))
                    for i in range(4)]
            await asyncio.sleep(0.5)  # all four queued: resumed, they form one batch
            await c.post(url + "/resume")
            return await asyncio.gather(*sent)

    answers = asyncio.run(batch())
    assert [r.status_code for r in answers] == [200, 200, 500, 200]
    assert "breaks the model" in answers[2].json()["error"]["message"]


# ------------------------------------------------------------------ R2: bounded work


def test_r2_health_shows_the_models_max_model_len_and_longer_prompts_are_refused(served, tiny_policy_dir):
    from mars_cli.models.load import read_config

    h = httpx.get(served.url + "/health").json()
    cfg = read_config(tiny_policy_dir)
    assert h["max_model_len"] == (cfg.get("max_position_embeddings") or cfg["text_config"]["max_position_embeddings"])
    one_line_400(httpx.post(served.url + GEN, json=gen_body(ids=[1] * h["max_model_len"])), "max_model_len")


def test_r2_max_tokens_is_bounded_by_max_model_len(in_proc):
    url, _ = in_proc
    r = httpx.post(url + GEN, json=gen_body({"max_tokens": 10 ** 12, "logit_bias": None}, ids=[1] * 40), timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["token_ids"]) <= 48 - 40


def test_r2_huge_token_bodies_are_refused_before_parsing(in_proc):
    url, _ = in_proc
    body = b'{"token_ids": [' + b"1," * 3_000_000 + b'1], "sampling_params": {"max_tokens": 1}}'
    r = httpx.post(url + GEN, content=body, timeout=60)
    assert r.status_code == 413 and "JSON values" in r.json()["error"]["message"]


def test_r2_a_disconnected_clients_generation_is_cancelled(tiny_policy_dir):
    from mars_cli.serve.run import in_thread

    app = hf_app(tiny_policy_dir.parent)
    with in_thread(app, str(tiny_policy_dir)) as url:
        host, port = url.removeprefix("http://").split(":")
        payload = json.dumps(gen_body({"max_tokens": 30_000})).encode()
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                      % (GEN.encode(), len(payload), payload))
            while app.backend._busy == 0:  # taken by the batcher: generating
                time.sleep(0.05)
        # the client is gone: its generation ends at the next token, far short of 30,000
        stats = app.backend.stats
        for _ in range(600):
            if stats["batches"]:
                break
            time.sleep(0.2)
        assert stats["batches"] == 1 and stats["generated_tokens"] < 30_000
        r = httpx.post(url + GEN, json=gen_body(), timeout=60)  # and the server serves the next one
        assert r.status_code == 200


# ------------------------------------------------------------------ R3, R4: images


def _png(w, h, seed=0) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_body(app, url_data):
    pad = app.backend.image_pad
    return gen_body(ids=[1, pad, 2], content_parts=[{"type": "image_url", "url": url_data}])


def test_r3_max_image_pixels_refuses_a_larger_image(in_proc):
    url, app = in_proc
    msg = one_line_400(httpx.post(url + GEN, json=_image_body(app, _png(600, 500)), timeout=60), "over the limit")
    assert "content_parts[0]" in msg and "spool" not in msg
    assert httpx.post(url + GEN, json=_image_body(app, _png(60, 50)), timeout=60).status_code == 200


def test_r2_a_prompt_over_max_model_len_once_its_images_are_expanded_is_400(in_proc):
    url, app = in_proc  # max_model_len 48; a 400x400 image is about 200 tokens
    one_line_400(httpx.post(url + GEN, json=_image_body(app, _png(400, 400)), timeout=60), "images expanded", "48")


def test_r3_concurrent_decodes_share_the_process_pixel_budget(in_proc, monkeypatch):
    """The request checks decode through images._decode_file, whose pixel budget every
    thread shares (MARS_DECODE_PIXELS): here 2,500 px, two of these 1,200-px images at once."""
    from mars_cli import images

    url, app = in_proc
    monkeypatch.setenv("MARS_DECODE_PIXELS", "2500")
    live, peak, lock = [0], [0], threading.Lock()
    real = images._decode_pillow

    def counting(*a, **kw):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            time.sleep(0.2)
            return real(*a, **kw)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(images, "_decode_pillow", counting)

    async def many():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(url + GEN, json=_image_body(app, _png(40, 30, seed=100 + i)))
                                          for i in range(8)))

    assert [r.status_code for r in asyncio.run(many())] == [200] * 8
    assert peak[0] == 2 and images._decoding.held == 0


def test_r4_refused_images_leave_nothing_and_the_spool_is_bounded_in_bytes(in_proc):
    url, app = in_proc
    junk = "data:image/png;base64," + base64.b64encode(os.urandom(200_000)).decode()
    for _ in range(10):
        one_line_400(httpx.post(url + GEN, json=_image_body(app, junk), timeout=60), "content_parts[0]")
    spool = app.backend._spool
    assert not [p for p in spool.dir.iterdir() if p.stat().st_size == 200_000]
    spool.max_bytes = 3 * len(base64.b64decode(_png(60, 50, seed=1).split(",")[1]))
    for i in range(8):
        assert httpx.post(url + GEN, json=_image_body(app, _png(60, 50, seed=i)), timeout=60).status_code == 200
    assert sum(p.stat().st_size for p in spool.dir.iterdir()) <= spool.max_bytes


def test_r4_spool_of_a_killed_server_is_removed_at_the_next_start(tiny_policy_dir, tmp_path):
    a = Served(tiny_policy_dir, env={"TMPDIR": str(tmp_path)})
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith("mars-spool-")]
    a.proc.kill()
    a.stop()
    assert left.exists()  # a kill -9 cleans nothing
    b = Served(tiny_policy_dir, env={"TMPDIR": str(tmp_path)})
    try:
        assert not left.exists()
        assert len([p for p in tmp_path.iterdir() if p.name.startswith("mars-spool-")]) == 1
    finally:
        assert b.stop() == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("mars-spool-")]  # a clean exit removes its own


# ------------------------------------------------------------------ R5: /load reads what it checked


class _Reader:
    """A backend whose load reads a marker file through the path it is given, after a swap."""

    engine, load_by_fd, max_model_len, stats, pixels, failure = "fake", True, None, None, None, None

    def __init__(self, swap):
        self.swap, self.read = swap, None

    async def load(self, path, version, real=None):
        self.swap()  # the checked folder is replaced by a symlink to an outside one, mid-load
        self.read = (Path(path) / "marker").read_text()
        return {"path": real, "fingerprint": "f"}


def _load(app, path):
    from mars_cli.serve.http import HTTPError, Request

    req = Request("POST", "/load", {}, {}, json.dumps({"path": str(path)}).encode())
    try:
        return asyncio.run(app.load(req))
    except HTTPError as e:
        return e.status, e.message


def test_r5_load_reads_the_directory_it_checked_not_a_symlink_swapped_in(tmp_path):
    from mars_cli.serve.app import App

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "ck").mkdir(parents=True)
    outside.mkdir()
    (allowed / "ck" / "marker").write_text("inside")
    (outside / "marker").write_text("OUTSIDE")

    def swap():
        (allowed / "ck").rename(tmp_path / "moved")
        (allowed / "ck").symlink_to(outside)

    backend = _Reader(swap)
    app = App(backend, allow_load=str(allowed), max_images=1, max_image_bytes=1)
    status, body = _load(app, allowed / "ck")
    assert status == 200 and backend.read == "inside" and body["policy"] == str(allowed / "ck")


def test_r5_load_refuses_symlinks_leading_out_of_allow_load(tmp_path):
    from mars_cli.serve.app import App

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "ck").mkdir(parents=True)
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"weights")
    (allowed / "ck" / "model.safetensors").symlink_to(outside / "model.safetensors")
    (allowed / "dirlink").symlink_to(outside)
    (allowed / "ok").mkdir()
    (allowed / "ok" / "a").write_text("x")
    (allowed / "ok" / "b").symlink_to(allowed / "ok" / "a")  # inside: fine
    app = App(_Reader(lambda: None), allow_load=str(allowed), max_images=1, max_image_bytes=1)
    status, msg = _load(app, allowed / "ck")
    assert status == 403 and "model.safetensors is a symlink" in msg
    status, msg = _load(app, allowed / "dirlink")
    assert status == 403 and "outside" in msg
    (allowed / "ok" / "marker").write_text("ok")
    assert _load(app, allowed / "ok")[0] == 200


# ------------------------------------------------------------------ R6: slow clients, connection limit


def _server(**kw):
    from mars_cli.serve.http import HTTPServer

    async def echo(req):
        return 200, {"n": len(req.body)}

    return HTTPServer({("POST", "/echo"): echo, ("GET", "/h"): echo}, **kw)


def _in_loop(server, fn):
    """Run `fn(port)` on a thread while `server` serves on this loop."""
    async def main():
        port = await server.start("127.0.0.1", 0)
        try:
            return await asyncio.to_thread(fn, port)
        finally:
            await server.close()

    return asyncio.run(main())


def test_r6_a_slow_client_meets_a_deadline_per_request_not_per_read():
    def trickle(port):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            t0 = time.monotonic()
            s.settimeout(0.3)
            while time.monotonic() - t0 < 30:  # a byte every 0.3 s: each read is quick, the request never ends
                try:
                    s.sendall(b"x")
                    got = s.recv(4096)
                    return got, time.monotonic() - t0
                except socket.timeout:
                    continue
            return b"", None

    got, after = _in_loop(_server(read_timeout=1.5), trickle)
    assert got.startswith(b"HTTP/1.1 408") and after < 20, got


def test_r6_connections_over_the_limit_get_503():
    def crowd(port):
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        time.sleep(0.3)
        try:
            return httpx.get(f"http://127.0.0.1:{port}/h", timeout=10)
        finally:
            for s in held:
                s.close()

    r = _in_loop(_server(max_connections=2), crowd)
    assert r.status_code == 503 and "2 connections" in r.json()["error"]["message"]


def test_minor_non_ascii_api_key_compares_utf8_bytes():
    def calls(port):
        url = f"http://127.0.0.1:{port}/h"
        return [httpx.get(url, headers={"Authorization": "Bearer clé-ключ".encode()}).status_code,
                httpx.get(url, headers={"Authorization": "Bearer clé-ключ".encode("utf-8")[:-1]}).status_code,
                httpx.get(url, headers={"Authorization": "Bearer cl\xe9-".encode("latin-1")}).status_code]

    assert _in_loop(_server(api_key="clé-ключ"), calls) == [200, 401, 401]
