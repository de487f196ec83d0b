"""`mars serve --engine hf` on the tiny model: generation, reload, pause/sleep, and every refusal."""

from __future__ import annotations

import asyncio
import base64
import shutil
import threading

import httpx
import pytest
import torch

from helpers_rollout import make_image

pytestmark = pytest.mark.network


def hf_app(**kw):
    from mars_cli.serve.app import App
    from mars_cli.serve.hf_backend import HFBackend

    backend = HFBackend(max_num_seqs=kw.pop("max_num_seqs", 8), seed=0)
    return App(backend, allow_load=kw.pop("allow_load"), max_images=kw.pop("max_images", 4),
               max_image_bytes=kw.pop("max_image_bytes", 1 << 20), **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_policy_dir):
    """ck/ (the tiny model) and ck2/ (other weights) side by side, plus a broken sibling."""
    from mars_cli.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("ckpts")
    ck = root / "ck"
    shutil.copytree(tiny_policy_dir, ck)
    ck2 = make_tiny_model(root / "ck2", arch="qwen2.5-vl", seed=1)
    broken = root / "broken"
    shutil.copytree(ck, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    return ck, ck2, broken


@pytest.fixture(scope="module")
def server(models):
    from mars_cli.serve.run import in_thread

    ck = models[0]
    app = hf_app(allow_load=str(ck.parent))
    with in_thread(app, str(ck)) as url:
        yield url, app


def prompt(engine, text="Describe it.", images=0):
    r = engine.renderer
    pads = "<|vision_start|><|image_pad|><|vision_end|>" * images
    return r.tok.encode(f"<|im_start|>user\n{pads}{text}<|im_end|>\n<|im_start|>assistant\n")


def forward_logprobs(policy_dir, ids, images, n_new):
    from mars_cli.models.logprobs import token_logprobs
    from mars_cli.models.load import load_policy

    pol = load_policy(policy_dir)
    lp = token_logprobs(pol, [(ids, images)], masks=[[0] * (len(ids) - n_new) + [1] * n_new])[0]
    return lp[len(ids) - n_new:]


def test_server_tokens_and_logprobs_equal_a_forward_pass(server, models, tmp_path):
    from mars_cli.engines import GenRequest, Sampling, open_engine

    url, app = server
    eng = open_engine("server", policy=None, sampling=Sampling(temperature=1.0), urls=[url])
    assert eng.path == str(models[0]) and eng.fingerprint == app.fingerprint and eng.max_images == 4
    img = make_image(tmp_path / "a.png", size=(120, 90))
    reqs = [GenRequest(ids=prompt(eng, images=1), images=[img], max_new_tokens=12),
            GenRequest(ids=prompt(eng, "Hi"), max_new_tokens=5), GenRequest(ids=prompt(eng, "Yo"), max_new_tokens=9)]
    outs = eng.generate(reqs)  # three at once: micro-batched into one generate
    for req, out in zip(reqs, outs):
        assert out.error is None and 0 < len(out.ids) <= req.max_new_tokens
        assert out.weight_version == app.weight_version and out.fingerprint == app.fingerprint
        want = forward_logprobs(models[0], req.ids + out.ids, req.images, len(out.ids))
        assert torch.allclose(torch.tensor(out.logprobs), want.float(), atol=2e-4), (out.logprobs, want)
        assert out.finish == ("stop" if out.ids[-1] == eng.special["im_end"] else "length")
    assert eng.image_tokens(img) > 0
    st = httpx.get(url + "/health").json()["stats"]
    assert st["requests"] >= 3 and st["batches"] < st["requests"]  # micro-batched
    assert st["generated_tokens"] >= sum(len(o.ids) for o in outs) and st["busy_seconds"] > 0


def test_episodes_through_the_server_pass_rollout_check(server, models, tmp_path):
    from mars_cli.agent.check import check_trajectory
    from mars_cli.agent.loop import AgentLoop, Limits
    from mars_cli.agent.run import open_toolbox
    from mars_cli.engines import Sampling, open_engine

    url, app = server
    eng = open_engine("server", policy=str(models[0]), sampling=Sampling(temperature=1.0), urls=[url])
    img = make_image(tmp_path / "t.png", size=(200, 150))
    tasks = [{"schema_version": 1, "id": f"t{i}", "question": "What colour?", "images": [img], "answers": ["red"]}
             for i in range(2)]
    loop = AgentLoop(eng, open_toolbox(tmp_path / "art", search_backend="local"),
                     limits=Limits(max_turns=2, max_total_tokens=2048, max_new_tokens=16))
    recs = list(loop.run(tasks, n=2))
    assert len(recs) == 4
    for rec in recs:
        assert rec["policy"]["fingerprint"] == app.fingerprint
        assert check_trajectory(rec, eng.renderer) == []
        t = rec["tokens"]
        gen = [i for i, m in enumerate(t["mask"]) if m]
        if rec["finish"] != "error" and len(gen) and len(gen) == gen[-1] - gen[0] + 1:  # one turn: compare exactly
            want = forward_logprobs(models[0], t["ids"], t["images"], len(gen))
            got = torch.tensor([t["logprobs"][i] for i in gen])
            assert torch.allclose(got, want.float()[:len(gen)], atol=2e-4)


def test_push_loads_a_sibling_checkpoint_and_a_failed_load_keeps_the_old(models, tmp_path):
    from mars_cli.engines import GenRequest, Sampling, open_engine
    from mars_cli.models.load import fingerprint
    from mars_cli.serve.push import PushError, push_checkpoint
    from mars_cli.serve.run import in_thread

    ck, ck2, broken = models
    threads = set(threading.enumerate())
    with in_thread(hf_app(allow_load=str(ck.parent)), str(ck)) as url:
        eng = open_engine("server", policy=None, sampling=Sampling(temperature=0), urls=[url])
        before = eng.generate([GenRequest(ids=prompt(eng), max_new_tokens=6)])[0]
        (res,) = push_checkpoint([url], str(ck2))
        assert res["fingerprint"] == fingerprint(ck2) and res["weight_version"] == 2 and res["url"] == url
        after = eng.generate([GenRequest(ids=prompt(eng), max_new_tokens=6)])[0]
        assert (before.fingerprint, before.weight_version) == (fingerprint(ck), 1)
        assert (after.fingerprint, after.weight_version) == (fingerprint(ck2), 2)
        assert after.logprobs != before.logprobs  # other weights
        with pytest.raises(PushError, match=f"{url}: load failed \\(HTTP 422\\).*still serving"):
            push_checkpoint([url], str(broken))
        h = httpx.get(url + "/health").json()
        assert (h["status"], h["fingerprint"], h["weight_version"]) == ("ready", fingerprint(ck2), 2)
        assert "broken" in h["last_error"]
        again = eng.generate([GenRequest(ids=prompt(eng), max_new_tokens=6)])[0]
        assert again.logprobs == after.logprobs and again.weight_version == 2
    # the server thread, its model worker and its executors are all gone
    assert not [t.name for t in set(threading.enumerate()) - threads if t.name.startswith(("mars-serve", "asyncio_"))]


def test_a_load_after_the_served_folder_was_pruned(models, tmp_path):
    """update --follow --keep-last 1 deletes step-1 once step-2 is saved, while the server
    still serves step-1: the load of step-2 (then step-3) must not read the old folder."""
    from mars_cli.models.load import fingerprint
    from mars_cli.serve.push import push_checkpoint
    from mars_cli.serve.run import in_thread

    ck, ck2, _ = models
    steps = [tmp_path / f"step-{i}" for i in (1, 2, 3)]
    for step, src in zip(steps, (ck, ck2, ck)):
        shutil.copytree(src, step)
    with in_thread(hf_app(allow_load=str(tmp_path)), str(steps[0])) as url:
        for i in (1, 2):
            shutil.rmtree(steps[i - 1])  # pruned while served
            (res,) = push_checkpoint([url], str(steps[i]))
            assert res["weight_version"] == i + 1 and res["fingerprint"] == fingerprint(steps[i])


def test_refusals(server, tmp_path):
    url, app = server
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    r = httpx.post(url + "/load", json={"path": str(outside)})
    assert r.status_code == 403 and "--allow-load" in r.json()["error"]["message"]
    ids = [1, 2, 3]
    sp = {"max_tokens": 2, "logprobs": 0}
    r = httpx.post(url + "/inference/v1/generate",
                   json={"token_ids": ids, "sampling_params": sp, "content_parts": [{"type": "image_url", "url": "file:///etc/passwd"}]})
    assert r.status_code == 400 and "opens no paths" in r.json()["error"]["message"]
    png = base64.b64encode(open(make_image(tmp_path / "s.png", size=(40, 40)), "rb").read()).decode()
    part = {"type": "image_url", "url": "data:image/png;base64," + png}
    r = httpx.post(url + "/inference/v1/generate", json={"token_ids": ids, "sampling_params": sp, "content_parts": [part] * 5})
    assert r.status_code == 400 and "limit is 4" in r.json()["error"]["message"]
    r = httpx.post(url + "/inference/v1/generate", json={"token_ids": ids, "sampling_params": sp, "content_parts": [part]})
    assert r.status_code == 400 and "one <|image_pad|> per image" in r.json()["error"]["message"]
    big = "A" * (2 << 20)
    r = httpx.post(url + "/inference/v1/generate",
                   json={"token_ids": ids, "sampling_params": sp, "content_parts": [{"type": "image_url", "url": "data:image/png;base64," + big}]})
    assert r.status_code == 413
    r = httpx.post(url + "/inference/v1/generate", json={"token_ids": [10 ** 9], "sampling_params": sp})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = httpx.post(url + "/inference/v1/generate", json={"token_ids": ids, "sampling_params": {**sp, "seed": 3}})
    assert r.status_code == 400
    r = httpx.post(url + "/inference/v1/generate", json={"token_ids": ids, "sampling_params": sp, "features": {}})
    assert r.status_code == 400 and "features" in r.json()["error"]["message"]
    r = httpx.post(url + "/inference/v1/generate", json={"token_ids": ids, "sampling_params": sp, "stream": True})
    assert r.status_code == 400
    r = httpx.post(url + "/inference/v1/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(url + "/nope").status_code == 404


def test_body_limit_and_api_key_on_every_route(models):
    from mars_cli.serve.run import in_thread

    ck = models[0]
    with in_thread(hf_app(allow_load=str(ck.parent)), str(ck), api_key="s3cret", max_body=4096) as url:
        for method, path in (("GET", "/health"), ("POST", "/load"), ("POST", "/pause"), ("POST", "/sleep"),
                             ("POST", "/inference/v1/generate")):
            r = httpx.request(method, url + path)
            assert r.status_code == 401, path
            r = httpx.request(method, url + path, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, path
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/health", headers=ok).status_code == 200
        r = httpx.post(url + "/inference/v1/generate", headers=ok, content=b"x" * 10000)
        assert r.status_code == 413


def test_exposure_needs_a_key_and_a_taken_port_is_a_clear_error(models):
    from mars_cli.errors import MarsError, UsageError
    from mars_cli.serve.http import HTTPServer
    from mars_cli.serve.run import check_exposure

    with pytest.raises(UsageError, match="MARS_SERVE_API_KEY"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", "key")
    check_exposure("127.0.0.1", None)

    async def two():
        a = HTTPServer({})
        port = await a.start("127.0.0.1", 0)
        try:
            with pytest.raises(MarsError, match=f"cannot listen on 127.0.0.1:{port}.*another --port"):
                await HTTPServer({}).start("127.0.0.1", port)
        finally:
            await a.close()

    asyncio.run(two())


def test_pause_holds_requests_and_sleep_frees_then_restores(models):
    from mars_cli.engines import GenRequest, Sampling, open_engine
    from mars_cli.serve.run import in_thread

    ck = models[0]
    with in_thread(hf_app(allow_load=str(ck.parent)), str(ck)) as url:
        eng = open_engine("server", policy=None, sampling=Sampling(temperature=0), urls=[url])
        want = eng.generate([GenRequest(ids=prompt(eng), max_new_tokens=5)])[0]
        assert httpx.post(url + "/pause", params={"mode": "wait"}).json() == {"status": "paused"}
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "paused"
        assert httpx.get(url + "/is_paused").json() == {"is_paused": True}
        r = httpx.post(url + "/inference/v1/generate", json={"token_ids": [1], "sampling_params": {"max_tokens": 1}})
        assert r.status_code == 503

        async def resume_later():
            await asyncio.sleep(1.0)
            async with httpx.AsyncClient() as c:
                await c.post(url + "/resume")

        async def both():
            got, _ = await asyncio.gather(eng.agenerate(GenRequest(ids=prompt(eng), max_new_tokens=5)), resume_later())
            await eng.aclose()
            return got

        got = asyncio.run(both())  # waited out the pause, then served
        assert got.ids == want.ids
        for level in (1, 2):
            assert httpx.post(url + "/sleep", params={"level": level}).status_code == 200
            assert httpx.get(url + "/health").json()["status"] == "sleeping"
            assert httpx.post(url + "/wake_up").status_code == 200
            assert eng.generate([GenRequest(ids=prompt(eng), max_new_tokens=5)])[0].ids == want.ids


def test_a_dead_server_fails_only_its_requests_then_none_left_raises(models):
    from mars_cli.engines import GenRequest, Sampling, open_engine
    from mars_cli.errors import MarsError
    from mars_cli.serve.run import in_thread

    ck = models[0]
    with in_thread(hf_app(allow_load=str(ck.parent)), str(ck)) as live:
        with in_thread(hf_app(allow_load=str(ck.parent)), str(ck)) as doomed:
            eng = open_engine("server", policy=None, sampling=Sampling(temperature=0), urls=[live, doomed])
        # `doomed` is gone: requests routed to it fail with its URL, it is dropped, the rest go on.
        outs = eng.generate([GenRequest(ids=prompt(eng), max_new_tokens=3) for _ in range(4)])
        errors = [o.error for o in outs if o.error]
        assert errors and all(e.startswith(doomed + ": ") for e in errors)
        assert len(errors) < 4 and list(eng.alive) == [live]
        assert all(o.error is None for o in eng.generate([GenRequest(ids=prompt(eng), max_new_tokens=3)] * 3))
    outs = eng.generate([GenRequest(ids=prompt(eng), max_new_tokens=3)])
    assert outs[0].error.startswith(live + ": ")
    with pytest.raises(MarsError, match="no server left"):
        eng.generate([GenRequest(ids=prompt(eng), max_new_tokens=3)])


def test_client_refuses_a_policy_the_server_does_not_serve(server, models):
    from mars_cli.engines import Sampling, open_engine
    from mars_cli.errors import MarsError

    url, _ = server
    with pytest.raises(MarsError, match="is not what the servers serve"):
        open_engine("server", policy=str(models[1]), sampling=Sampling(), urls=[url])
    with pytest.raises(MarsError, match="no server is serving"):
        open_engine("server", policy=None, sampling=Sampling(), urls=["http://127.0.0.1:9"])


def test_pause_keep_queues_requests_until_resume(server):
    url, app = server

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            assert (await c.post(url + "/pause", params={"mode": "keep"})).status_code == 200
            req = asyncio.create_task(c.post(url + "/inference/v1/generate", json={
                "token_ids": [151644, 872, 198, 13048, 151645], "sampling_params": {"max_tokens": 2, "logprobs": 0}}))
            await asyncio.sleep(1.0)
            assert not req.done()  # accepted and held, not refused
            assert (await c.post(url + "/pause", params={"mode": "wait"})).status_code == 200  # drains it
            r = await req
            assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2
            assert (await c.post(url + "/resume")).status_code == 200
            assert (await c.get(url + "/health")).status_code == 200

    asyncio.run(go())


def test_a_reply_ends_at_the_checkpoints_end_ids_and_the_stop_ids_asked(models, tmp_path):
    """As vLLM's token route: a reply ends at <|im_end|>, at the checkpoint's own end ids
    (Qwen-VL's generation config: <|endoftext|> too) and at the request's stop_token_ids.
    `rollout --engine server` under either profile gets the same turn as in process."""
    import json

    from clirun import Ran
    from helpers_rollout import always_emits
    from mars_cli import protocol, sensenova
    from mars_cli.jsonl import write_records
    from mars_cli.records import make_task
    from mars_cli.serve.app import App
    from mars_cli.serve.hf_backend import HFBackend
    from mars_cli.serve.push import push_checkpoint
    from mars_cli.serve.run import in_thread

    eot = 151643
    ck = always_emits(models[0], tmp_path / "eot", eot)
    plain = always_emits(models[0], tmp_path / "eot-plain", eot)  # its generation config ends at <|im_end|> only
    gen = json.loads((plain / "generation_config.json").read_text())
    (plain / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 151645}))
    img = make_image(tmp_path / "a.png", size=(120, 90))
    tasks = tmp_path / "tasks.jsonl"
    write_records([make_task("t", "Which? (A) x (B) y", images=[img], answers=["A"], scorer="mcq",
                             meta={"system_prompt": sensenova.SYSTEM_PROMPT})], tasks)
    lo, hi, _ = protocol.get_profile("sensenova-eval").pixels  # as `mars serve --min-pixels --max-pixels`
    app = App(HFBackend(max_num_seqs=8, seed=0, min_pixels=lo, max_pixels=hi), allow_load=str(tmp_path),
              max_images=4, max_image_bytes=1 << 20)

    def ask(stops=None):
        sp = {"max_tokens": 6, "logprobs": 0, **({"stop_token_ids": stops} if stops is not None else {})}
        r = httpx.post(url + "/inference/v1/generate", json={"token_ids": [1, 2, 3], "sampling_params": sp})
        return r.json()["choices"][0] if r.status_code == 200 else r

    with in_thread(app, str(ck)) as url:
        c = ask()
        assert (c["token_ids"], c["finish_reason"], c["stop_reason"]) == ([eot], "stop", eot)
        for prof in ("sensenova-eval", "sensenova"):
            out = tmp_path / f"{prof}.jsonl"
            r = Ran(["rollout", tasks, "--engine", "server", "--server", url, "--protocol", prof, "--max-turns", "1",
                     "--max-new-tokens", "8", "-o", out, "-q"])
            assert r.exit_code == 0, r.stderr
            [rec] = [json.loads(x) for x in out.read_text().splitlines()]
            t = rec["tokens"]
            assert [i for i, m in zip(t["ids"], t["mask"]) if m] == [eot] and rec["finish"] != "error", prof
        push_checkpoint([url], str(plain))
        c = ask()
        assert (c["token_ids"], c["finish_reason"], c["stop_reason"]) == ([eot] * 6, "length", None)
        c = ask([eot])
        assert (c["token_ids"], c["finish_reason"], c["stop_reason"]) == ([eot], "stop", eot)
        r = ask([10 ** 9])
        assert r.status_code == 400 and "stop_token_ids" in r.json()["error"]["message"]
