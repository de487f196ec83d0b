"""`mars serve --engine vllm`: the front layer against a child that answers as vLLM 0.33 does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.network
FAKE = str(Path(__file__).with_name("fake_vllm.py"))


def calls(log: Path) -> list[dict]:
    return [json.loads(ln) for ln in log.read_text().splitlines()]


@pytest.fixture
def vllm_server(tiny_policy_dir, tmp_path, monkeypatch):
    from mars_cli.serve.app import App
    from mars_cli.serve.run import in_thread
    from mars_cli.serve.vllm_backend import VLLMBackend

    ck = tmp_path / "ck"
    shutil.copytree(tiny_policy_dir, ck)
    log = tmp_path / "vllm.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    backend = VLLMBackend(tp=2, dp=4, max_model_len=8192, max_images=3, max_num_seqs=64, enforce_eager=True,
                          dtype="bfloat16", min_pixels=3136, max_pixels=401408, seed=7, startup_timeout=60,
                          executable=[sys.executable, FAKE])
    app = App(backend, allow_load=str(tmp_path), max_images=3, max_image_bytes=1 << 20)
    with in_thread(app, str(ck)) as url:
        yield url, app, ck, log


def test_launches_vllm_serve_with_the_rl_endpoints_and_forwards_generation(vllm_server, tmp_path):
    from mars_cli.engines import GenRequest, Sampling, open_engine
    from helpers_rollout import make_image

    url, app, ck, log = vllm_server
    first = calls(log)[0]
    argv = first["argv"]
    assert first["VLLM_SERVER_DEV_MODE"] == "1" and argv[:2] == ["serve", str(ck)]
    flags = dict(zip(argv[2::1], argv[3::1]))
    assert flags["--host"] == "127.0.0.1" and "--enable-scale-out" in argv and "--enable-sleep-mode" in argv
    assert flags["--worker-extension-cls"] == "mars_cli.engines.vllm_worker.WorkerExtension"
    assert flags["--logprobs-mode"] == "processed_logprobs" and flags["--generation-config"] == "vllm"
    assert (flags["--tensor-parallel-size"], flags["--data-parallel-size"]) == ("2", "4")
    assert json.loads(flags["--limit-mm-per-prompt"]) == {"image": 3, "video": 0}
    assert json.loads(flags["--mm-processor-kwargs"]) == {"min_pixels": 3136, "max_pixels": 401408}
    assert (flags["--max-model-len"], flags["--max-num-seqs"], flags["--dtype"], flags["--seed"]) == ("8192", "64", "bfloat16", "7")
    assert "--enforce-eager" in argv and int(flags["--port"]) != int(url.rsplit(":", 1)[1])
    assert calls(log)[-1]["body"] == {"new_version": "1"}  # /update_weight_version at start

    h = httpx.get(url + "/health").json()
    assert (h["engine"], h["weight_version"], h["max_images"]) == ("vllm", 1, 3)
    assert h["pixels"] == {"min": 3136, "max": 401408}
    eng = open_engine("server", policy=str(ck), sampling=Sampling(temperature=0.8, top_k=0), urls=[url])
    img = make_image(tmp_path / "a.png", size=(64, 48))
    pads = "<|vision_start|><|image_pad|><|vision_end|>"
    ids = eng.renderer.tok.encode(f"<|im_start|>user\n{pads}Hi<|im_end|>\n<|im_start|>assistant\n")
    out, short = eng.generate([GenRequest(ids=ids, images=[img], max_new_tokens=10),
                               GenRequest(ids=ids, images=[img], max_new_tokens=2)])
    assert out.ids[-1] == eng.special["im_end"] and len(out.ids) == 4 and out.finish == "stop"
    assert out.logprobs == [-0.25, -0.5, -0.75, -1.0] and out.weight_version == 1
    assert short.finish == "length" and len(short.ids) == 2
    sent = [c for c in calls(log) if c.get("path") == "/inference/v1/generate"][0]["body"]
    assert sent["token_ids"] == ids and sent["content_parts"][0]["url"].startswith("data:image/png;base64,")
    sp = sent["sampling_params"]
    assert (sp["temperature"], sp["top_k"], sp["logprobs"], sp["stop_token_ids"]) == (0.8, -1, 0, [eng.special["im_end"], eng.special["pad"]])
    assert set(sp["logit_bias"]) == {str(eng.special[k]) for k in ("image_pad", "vision_start", "vision_end")}


def test_load_is_pause_reload_version_resume_and_a_failure_restores(vllm_server, tiny_policy_dir):
    from mars_cli.models.load import fingerprint
    from mars_cli.models.load import load_tokenizer, special_ids
    from mars_cli.serve import probe
    from mars_cli.serve.push import ProbeError, PushError, push_checkpoint

    url, app, ck, log = vllm_server
    ck2 = ck.parent / "ck2"
    shutil.copytree(tiny_policy_dir, ck2)
    (ck2 / "model.safetensors").touch()  # new mtime: another fingerprint
    n = len(calls(log))
    # The fake's log-probs are no model's: a trainer that agrees with them proves the load,
    # the checkpoint itself (push_checkpoint's default reference) does not.
    agree = lambda probes: [[-0.25 * (k + 1) for k in range(len(p["token_ids"]))] for p in probes]  # noqa: E731
    (res,) = push_checkpoint([url], str(ck2), reference=agree)
    assert res["weight_version"] == 2 and res["fingerprint"] == fingerprint(ck2) != fingerprint(ck)
    assert res["probe"]["gap"] == 0
    seq = [(c["path"], c.get("query"), c.get("body")) for c in calls(log)[n:] if c.get("path") != "/health"]
    assert seq[:4] == [("/pause", {"mode": ["wait"]}, {}),
                       ("/collective_rpc", {}, {"method": "mars_reload_weights",
                                                "kwargs": {"weights_path": str(ck2)}, "timeout": 1800.0}),
                       ("/update_weight_version", {}, {"new_version": "2"}), ("/resume", {}, {})]
    assert [s[0] for s in seq[4:]] == ["/inference/v1/generate"]  # the push probe, on the new weights
    assert seq[4][2]["token_ids"] == probe.prompt_ids(special_ids(load_tokenizer(ck)))
    with pytest.raises(ProbeError, match=f"{url}: serves other weights than it reports"):
        push_checkpoint([url], str(ck2))  # weight version 3
    broken = ck.parent / "broken"
    shutil.copytree(tiny_policy_dir, broken)
    n = len(calls(log))
    with pytest.raises(PushError, match="deserializing header"):
        push_checkpoint([url], str(broken))
    rpcs = [c["body"]["kwargs"]["weights_path"] for c in calls(log)[n:] if c.get("path") == "/collective_rpc"]
    assert rpcs == [str(broken), str(ck2)]  # the old weights put back
    assert calls(log)[-1]["path"] in ("/resume", "/health")
    h = httpx.get(url + "/health").json()
    assert (h["status"], h["fingerprint"], h["weight_version"]) == ("ready", fingerprint(ck2), 3)


def test_sleep_wake_and_a_dead_child_fails_health(vllm_server):
    url, app, ck, log = vllm_server
    assert httpx.post(url + "/sleep", params={"level": 1}).status_code == 200
    assert httpx.get(url + "/health").status_code == 503
    assert [c for c in calls(log) if c.get("path") == "/sleep"][-1]["query"] == {"level": ["1"], "mode": ["wait"]}
    assert httpx.post(url + "/wake_up").status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    os.killpg(app.backend.proc.pid, signal.SIGKILL)
    deadline = time.time() + 10
    while httpx.get(url + "/health").status_code == 200 and time.time() < deadline:
        time.sleep(0.1)
    h = httpx.get(url + "/health")
    assert h.status_code == 503 and h.json()["status"] == "failed" and "exited" in h.json()["last_error"]
    r = httpx.post(url + "/inference/v1/generate", json={"token_ids": [1], "sampling_params": {"max_tokens": 1}})
    assert r.status_code == 503


def test_sleep_mode_off_leaves_vllm_without_it_and_sleep_answers_409(vllm_server):
    from mars_cli.serve.vllm_backend import VLLMBackend

    url, app, ck, log = vllm_server
    assert "--enable-sleep-mode" not in VLLMBackend(sleep_mode=False, executable=["vllm"]).argv(str(ck), 1)
    app.backend.sleep_mode = False  # what `mars serve --sleep-mode off` (or auto on a CPU) builds
    try:
        r = httpx.post(url + "/sleep", params={"level": 1})
        assert r.status_code == 409 and "without sleep mode" in r.json()["error"]["message"]
        assert httpx.post(url + "/wake_up").status_code == 200
        assert httpx.get(url + "/health").status_code == 200
        assert not [c for c in calls(log) if c.get("path") in ("/sleep", "/wake_up")]  # vLLM never asked
    finally:
        app.backend.sleep_mode = True


def test_weight_transfer_is_forwarded_and_counts_a_version(vllm_server):
    url, app, ck, log = vllm_server
    r = httpx.post(url + "/init_weight_transfer_engine", json={"init_info": {"master_port": 1234}})
    assert r.status_code == 200 and r.json() == {"message": "Weight transfer initialized"}
    assert httpx.post(url + "/update_weights", json={"update_info": {"names": ["w"]}}).status_code == 200
    r = httpx.post(url + "/finish_weight_update", json={"fingerprint": "abc123"})
    assert r.status_code == 200 and r.json()["weight_version"] == 2
    sent = [c for c in calls(log) if c.get("path") in ("/init_weight_transfer_engine", "/update_weights",
                                                          "/finish_weight_update")]
    assert [c["body"] for c in sent] == [{"init_info": {"master_port": 1234}}, {"update_info": {"names": ["w"]}},
                                         {"weight_version": "2"}]
    h = httpx.get(url + "/health").json()
    assert (h["fingerprint"], h["weight_version"]) == ("abc123", 2)
    out = httpx.post(url + "/inference/v1/generate", json={"token_ids": [5], "sampling_params": {"max_tokens": 2}}).json()
    assert out["choices"][0]["weight_versions"][0]["version"] == "2" and out["mars"]["fingerprint"] == "abc123"


def test_openai_routes_pass_through_to_vllm_after_the_layers_checks(vllm_server):
    import openai

    url, app, ck, log = vllm_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [str(ck)]
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=str(ck), messages=messages, max_tokens=5)
    assert r.choices[0].message.content == "fake reply" and r.usage.total_tokens == 7
    chunks = list(client.chat.completions.create(model=str(ck), messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "fake reply"
    assert chunks[-1].choices[0].finish_reason == "stop"
    sent = [c for c in calls(log) if c.get("path") == "/v1/chat/completions"]
    assert len(sent) == 2 and sent[1]["body"]["stream"] is True and sent[0]["body"]["max_tokens"] == 5
    with pytest.raises(openai.NotFoundError):  # vLLM's own answer, passed back
        client.chat.completions.create(model="other", messages=messages)
    # an image URL vLLM would fetch never reaches it
    with pytest.raises(openai.BadRequestError, match="data: URLs"):
        client.chat.completions.create(model=str(ck), messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}])
    assert len([c for c in calls(log) if c.get("path") == "/v1/chat/completions"]) == 3


def test_tied_modules_finds_the_embedding_and_the_head_that_share_a_weight(tiny_policy_dir):
    """vllm_worker.retie re-derives what vLLM computed from these at load time; the tiny
    model ties lm_head to embed_tokens as Qwen2.5-VL-3B does, and an untied model has none."""
    import torch

    from mars_cli.engines.vllm_worker import tied_modules
    from mars_cli.models.load import load_policy

    model = load_policy(tiny_policy_dir).model
    assert sorted(name for name, _ in tied_modules(model)) == ["lm_head", "model.language_model.embed_tokens"]
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    assert tied_modules(model) == []
    shared = torch.nn.Linear(2, 2)
    pair = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared)})  # one module twice: no tie
    assert tied_modules(pair) == []
