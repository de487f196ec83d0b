"""OpenAI's API on `mars serve --engine hf`, spoken to by the official `openai` client, unchanged."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from helpers_rollout import make_image
from test_serve import hf_app

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def served(tiny_policy_dir):
    from mars_cli.serve.run import in_thread

    app = hf_app(allow_load=str(tiny_policy_dir), max_images=2, max_image_bytes=1 << 20)
    with in_thread(app, str(tiny_policy_dir)) as url:
        yield url, app


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def test_models_chat_with_an_image_and_stream(served, tmp_path):
    from mars_cli.models.load import load_tokenizer, special_ids
    from mars_cli.rendering import Renderer

    url, app = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    [model] = client.models.list().data
    assert model.id == app.path
    image = make_image(tmp_path / "red.png", size=(64, 48))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": "What colour is it?"}]}]
    r = client.chat.completions.create(model=model.id, messages=messages, max_tokens=6, temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The same ids through the token route: the chat is rendered with the protocol's ChatML
    tok = load_tokenizer(app.path)
    renderer = Renderer(tok, special_ids(tok, app.path))
    ids, _, _ = renderer.render([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": [{"type": "image", "image": "x"},
                                                              {"type": "text", "text": "What colour is it?"}]}],
                                add_generation_prompt=True)
    g = httpx.post(url + "/inference/v1/generate", timeout=120, json={
        "token_ids": ids, "content_parts": [{"type": "image_url", "url": data_url(image)}],
        "sampling_params": {"temperature": 0, "max_tokens": 6}}).json()
    assert r.usage.prompt_tokens == len(ids)
    out = [t for t in g["choices"][0]["token_ids"] if t != renderer.sp["im_end"]]
    assert text == tok.decode(out, skip_special_tokens=True)
    # streamed: the same text, then the finish, then the usage, as server-sent events
    chunks = list(client.chat.completions.create(model=model.id, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # stop strings cut the answer; /v1/completions takes a plain prompt
    if len(text) > 2:
        cut = client.chat.completions.create(model=model.id, messages=messages, max_tokens=6, temperature=0,
                                             stop=[text[1:3]])
        assert cut.choices[0].message.content == text[:text.index(text[1:3])]
        assert cut.choices[0].finish_reason == "stop"
    c = client.completions.create(model=model.id, prompt="Hello", max_tokens=3, temperature=0)
    assert c.object == "text_completion" and isinstance(c.choices[0].text, str) and c.usage.completion_tokens <= 3


def test_the_routes_keep_the_servers_bounds_and_key(served, tiny_policy_dir, tmp_path):
    from mars_cli.serve.run import in_thread

    url, app = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    image = {"type": "image_url", "image_url": {"url": data_url(make_image(tmp_path / "a.png", size=(32, 32)))}}
    for content, said in (([image] * 3, "limit is 2"),
                          ([{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}], "data: URLs"),
                          ([{"type": "input_audio", "input_audio": {}}], "only text and image_url")):
        with pytest.raises(openai.BadRequestError, match=said):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n: only 1"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2)
    keyed = hf_app(allow_load=str(tiny_policy_dir))
    with in_thread(keyed, str(tiny_policy_dir), api_key="sekret") as kurl:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=kurl + "/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=kurl + "/v1", api_key="sekret").models.list().data[0].id == keyed.path


def test_rollout_engine_openai_against_mars_serve(served, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mars_cli.main import app as cli

    url, app = served
    tasks = tmp_path / "t.jsonl"
    image = make_image(tmp_path / "p.png", size=(64, 64))
    tasks.write_text(json.dumps({"id": "t1", "question": "What is it?", "images": [image], "answers": ["red"]}) + "\n")
    monkeypatch.setenv("MARS_OPENAI_API_KEY", "unused")
    r = CliRunner().invoke(cli, ["rollout", str(tasks), "--engine", "openai", "--base-url", url + "/v1", "--model", app.path,
                                 "--max-turns", "1", "--max-new-tokens", "4", "-n", "2"])
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(recs) == 2 and all(x["finish"] != "error" for x in recs), [x.get("error") for x in recs]
    assert all(x["messages"][-1]["role"] == "assistant" for x in recs)


def test_a_mars_serve_process_answers_the_official_client_behind_its_key(tiny_policy_dir):
    """`MARS_SERVE_API_KEY=… mars serve` as a user starts it: the official client with the
    key chats with the evaluation sampling (top-p, presence penalty) and completes a plain
    prompt; the wrong key is refused; SIGTERM ends it cleanly."""
    from test_serve_hardening import Served

    s = Served(tiny_policy_dir, env={"MARS_SERVE_API_KEY": "sekret"})
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        [model] = client.models.list().data
        r = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0.7, top_p=0.8, presence_penalty=1.5)
        assert r.choices[0].finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 4
        c = client.completions.create(model=model.id, prompt="Hello", max_tokens=3, temperature=0)
        assert c.object == "text_completion" and c.usage.completion_tokens <= 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.stderr, s.stderr
