"""`mars serve --engine vllm` against the real vLLM: rollouts, loads, pushes, pause, a killed server.

One tied server (the tiny model's own layout) serves most tests in order; an untied one the
last two. Both start at once: their start is most of this file's time. Every load is judged by what the server then samples: its log-probs against the
trainer's forward pass of the new checkpoint (within GAP_BOUND) and of the old one (over 10×).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

import helpers_train as H
from helpers_rollout import make_image
from vllm_tier import ENV, GAP_BOUND, MARS, Server, assert_serves, copy, tier, tiny, trajectories_gap

pytestmark = [*tier, pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-serve")


@pytest.fixture(scope="module")
def models(root):
    """a, b: tied models of seeds 0 and 1; ua, ub: the same two untied."""
    return {"a": tiny(root / "a", 0), "b": tiny(root / "b", 1),
            "ua": tiny(root / "ua", 0, tied=False), "ub": tiny(root / "ub", 1, tied=False)}


@pytest.fixture(scope="module")
def tasks(root):
    from mars_cli.jsonl import write_records
    from mars_cli.records import make_task

    imgs = [make_image(root / f"img{i}.jpg", size=(112 + 28 * i, 84)) for i in range(3)]
    write_records([make_task(f"t{i}", f"What is in picture {i}?", images=[im], answers=["x"])
                   for i, im in enumerate(imgs)], root / "tasks.jsonl")
    return root / "tasks.jsonl"


@pytest.fixture(scope="module")
def servers(models, root):
    both = [Server(models["a"], "--allow-load", str(root), "--seed", "0"),
            Server(models["ua"], "--allow-load", str(root))]
    try:
        yield [s.wait() for s in both]
    finally:
        for s in both:
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def untied(servers):
    return servers[1]


def run(*args, timeout=600, **kw):
    return subprocess.run([*MARS, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def rollout_in_background(urls: str, tasks, out, *args) -> subprocess.Popen:
    """`mars rollout --server URLS` of 4 samples per task, left running."""
    return subprocess.Popen([*MARS, "rollout", "--server", urls, str(tasks), "-n", "4", *map(str, args),
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def every_episode_once(p: subprocess.Popen, out) -> list[dict]:
    """The rollout's records once it ends: each (task, sample) exactly once."""
    try:
        _, err = p.communicate(timeout=600)
    finally:
        p.kill()
    assert p.returncode == 0, err
    recs = records(out)
    assert sorted((x["group"], x["sample"]) for x in recs) == [(f"t{i}", s) for i in range(3) for s in range(4)]
    return recs


def wait_for_episodes(out, n: int, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not (out.exists() and out.read_bytes().count(b"\n") >= n):
        time.sleep(0.05)


def load(url, path) -> dict:
    """A push (POST /load, then the probe's proof: a ProbeError over the bound)."""
    from mars_cli.serve.push import push_checkpoint

    (res,) = push_checkpoint([url], str(path))
    assert res["probe"]["gap"] <= GAP_BOUND
    return res


def test_rollout_through_the_server_is_token_exact_and_matches_the_trainer(server, models, tasks, root):
    assert server.info["engine"] == "vllm" and httpx.get(server.url + "/health").json()["status"] == "ready"
    out = root / "traj.jsonl"
    r = run("rollout", "--server", server.url, tasks, "-n", "2", "--max-turns", "2", "--max-new-tokens", "12",
            "--seed", "0", "-o", out)
    assert r.returncode == 0, r.stderr
    recs = records(out)
    assert sorted((x["group"], x["sample"]) for x in recs) == [(f"t{i}", s) for i in range(3) for s in range(2)]
    assert all(x["finish"] != "error" and x["tokens"]["ids"].count(151655) == 1 for x in recs)
    c = run("rollout", "--check", "--policy", models["a"], out)
    assert c.returncode == 0, c.stderr  # every stored token id is the one the messages decode to
    assert trajectories_gap(models["a"], recs) <= GAP_BOUND
    r = httpx.post(server.url + "/sleep", params={"level": 1})
    assert r.status_code == 409 and "sleep mode" in r.text  # --sleep-mode auto on a CPU: off


def test_the_openai_client_chats_with_an_image_through_vllms_own_routes(server, models, root):
    """`/v1/*` on `mars serve --engine vllm`: vLLM's own OpenAI server behind mars's layer,
    spoken to by the official client; its chat template renders what the protocol renders."""
    import base64

    import openai

    from mars_cli.models.load import load_tokenizer, special_ids
    from mars_cli.rendering import Renderer

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    [model] = client.models.list().data
    image = make_image(root / "chat.png", size=(112, 84))
    url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What colour is it?"}]}]
    r = client.chat.completions.create(model=model.id, messages=messages, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 6
    tok = load_tokenizer(models["a"])
    renderer = Renderer(tok, special_ids(tok, models["a"]))
    ids, _, _ = renderer.render([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": [{"type": "image", "image": "x"},
                                                              {"type": "text", "text": "What colour is it?"}]}],
                                add_generation_prompt=True)
    # one image placeholder there, expanded by vLLM to the image's patches: the rest is the
    # same tokens (mars asks vLLM for the template's own rendering of the parts, not vLLM's
    # newline-joined "string" form)
    pads = (112 // 28) * (84 // 28)
    assert r.usage.prompt_tokens == len(ids) - 1 + pads
    chunks = list(client.chat.completions.create(model=model.id, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError):  # mars's checks come first: an image that is no image
        client.chat.completions.create(model=model.id, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


def test_load_switches_tied_weights_exactly_and_back(server, models):
    assert load(server.url, models["b"])["weight_version"] == 2
    assert_serves(server.url, models["b"], models["a"])
    load(server.url, models["a"])
    assert_serves(server.url, models["a"], models["b"])


def test_vllm_ends_a_reply_at_the_checkpoints_end_ids_whatever_the_request_asks(server, models, root):
    """What mars's engines follow (engines.stop_ids, models.load.end_ids): vLLM ends a reply at
    the checkpoint's generation-config end ids (Qwen-VL's <|endoftext|> as well as
    <|im_end|>), in its chat server (what eval.py talks to, where vLLM serves the model) and
    in the token route, even when the request's stop ids name <|im_end|> alone."""
    import openai

    from helpers_rollout import always_emits
    from mars_cli.engines import Sampling, stop_ids
    from mars_cli.engines.server import generate_body
    from mars_cli.models.load import end_ids, load_tokenizer, special_ids

    eot = always_emits(models["a"], root / "eot", 151643)
    load(server.url, eot)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        [model] = client.models.list().data
        r = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=6, temperature=0)
        assert (r.choices[0].finish_reason, r.choices[0].message.content, r.usage.completion_tokens) == ("stop", "", 1)
        tok = load_tokenizer(eot)
        special = special_ids(tok, eot)
        ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        for stops in (None, stop_ids(special, end_ids(eot))):  # <|im_end|> alone; what mars's engines send
            body = generate_body(ids, Sampling(temperature=1.0), 6, special, stops)
            c = httpx.post(server.url + "/inference/v1/generate", json=body, timeout=120).json()["choices"][0]
            assert (c["token_ids"], c["finish_reason"]) == ([151643], "stop"), stops
    finally:
        load(server.url, models["a"])


def test_a_load_after_the_served_folder_was_pruned(server, models, root):
    """update --follow --keep-last 1 deletes the served step's folder before the next push."""
    import shutil

    first, second = copy(models["b"], root / "pruned-1"), copy(models["a"], root / "pruned-2")
    load(server.url, first)
    shutil.rmtree(first)
    load(server.url, second)
    assert_serves(server.url, second, models["b"])


def test_vllms_own_reload_serves_neither_checkpoint_and_the_probe_says_so(server, models):
    """Why `mars_reload_weights`: vLLM's in-place reload_weights (model_loader/reload/
    layerwise.py, finalize_layerwise_processing) skips process_weights_after_loading for a
    tied lm_head, whose CPU GEMM keeps a packed copy of the old embeddings. Asked directly,
    behind mars's back, vLLM serves a model that is neither checkpoint."""
    import psutil

    from mars_cli.serve import probe
    from vllm_tier import served_probe, gap

    child = next(p for p in psutil.Process(server.proc.pid).children(recursive=True) if "serve" in p.cmdline())
    cmd = child.cmdline()
    vllm_url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    r = httpx.post(vllm_url + "/collective_rpc", timeout=600,
                   json={"method": "reload_weights", "kwargs": {"weights_path": str(models["b"])}})
    assert r.status_code == 200, r.text
    seqs, served = served_probe(server.url)
    g_new, g_old = gap(models["b"], seqs, served), gap(models["a"], seqs, served)
    assert min(g_new, g_old) > 10 * probe.MAX_GAP, (f"vLLM's own reload_weights now serves a tied model right "
                                                    f"(gaps {g_new:.3g}, {g_old:.3g}): the retie may go", g_new, g_old)
    load(server.url, models["a"])  # mars's reload puts it right
    assert_serves(server.url, models["a"], models["b"])


def test_update_push_switches_the_served_weights(server, models, root):
    batch = H.write_batch(models["b"], root / "batch.jsonl", [1.0, -1.0], image_dir=root)
    before = httpx.get(server.url + "/health").json()
    assert before["policy"] == str(models["a"])
    r = run("update", batch, "--policy", models["b"], "--out", root / "c", "--lr", "1e-3", "--push", server.url)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["push"][0]["weight_version"] == before["weight_version"] + 1
    assert m["push"][0]["probe"]["gap"] <= GAP_BOUND  # update's own proof
    assert_serves(server.url, root / "c", models["a"])


def test_follow_pushes_two_steps_through_the_server(server, models, root):
    from test_update_follow import COMMON, advantage, judged_file

    b1 = advantage(judged_file(models["a"], root / "j1.jsonl", "a", 2), root / "b1.jsonl")
    b2 = advantage(judged_file(models["a"], root / "j2.jsonl", "b", 2), root / "b2.jsonl")
    version = httpx.get(server.url + "/health").json()["weight_version"]
    ck = root / "follow"
    r = run("update", "--follow", b1, b2, "--policy", models["a"], "--out", ck, *COMMON, "--push", server.url)
    assert r.returncode == 0, r.stderr
    ms = [json.loads(x) for x in r.stdout.splitlines()]
    assert [m["step"] for m in ms] == [1, 2]
    assert all(m["push"]["ok"] and m["push"]["probe"]["gap"] <= GAP_BOUND for m in ms)  # each push proven
    h = httpx.get(server.url + "/health").json()
    assert h["weight_version"] == version + 2 and h["policy"] == str(ck / "step-2")
    assert_serves(server.url, ck / "step-2", root / "c")


def test_the_whole_loop_rolls_out_trains_and_pushes_through_vllm_then_ends(server, models, tasks, root):
    """The README's pipeline on vLLM: rollout --server (looping, one group a batch, staleness
    1) | judge | advantage | update --follow --push, --max-steps 2. Each push is proven,
    step 1's batch (sampled by the starting weights) has the trainer's log-probs within the
    bound, and every stage ends by itself once the trainer is done."""
    load(server.url, models["a"])
    version = httpx.get(server.url + "/health").json()["weight_version"]
    d = root / "loop"
    d.mkdir()
    m = " ".join(map(str, MARS))
    pipeline = (f"{m} rollout --server {server.url} {tasks} -n 2 --max-turns 1 --max-new-tokens 8 --group-order "
                f"--loop --batch-groups 1 --max-staleness 1 | tee {d}/traj.jsonl | {m} judge | "
                f"{m} advantage --batch-groups 1 --group-size 2 | {m} update --follow --policy {models['a']} "
                f"--out {d}/ck --push {server.url} --max-steps 2 --lr 1e-3 --beta 0 --micro-batch-tokens 400 "
                f"> {d}/updates.jsonl")
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", pipeline], capture_output=True, text=True, env=ENV,
                       timeout=900, stdin=subprocess.DEVNULL)
    try:
        assert p.returncode == 0, p.stderr[-3000:]
        ms = records(d / "updates.jsonl")
        assert [x["step"] for x in ms] == [1, 2] and all(x["push"]["ok"] for x in ms)
        assert all(x["push"]["probe"]["gap"] <= GAP_BOUND for x in ms)
        assert ms[0]["logprob_gap"]["tokens"] > 0 and ms[0]["logprob_gap"]["max"] <= GAP_BOUND
        assert httpx.get(server.url + "/health").json()["weight_version"] == version + 2
        assert "the trainer ended: no new weights will come" in p.stderr
        assert all(x["policy"]["engine"] == "server" for x in records(d / "traj.jsonl"))
    finally:
        load(server.url, models["a"])


def test_pause_and_resume_under_load_lose_and_repeat_no_episode(server, models, tasks, root):
    load(server.url, models["a"])
    out = root / "paused.jsonl"
    # 3 at a time: episodes (one turn each: a random model's turn ends at the token limit)
    # keep starting while the server is paused
    p = rollout_in_background(server.url, tasks, out, "--max-turns", "2", "--max-new-tokens", "48", "--seed", "1",
                              "--max-inflight", "3")
    for mode, episodes in (("wait", 1), ("keep", 2)):
        wait_for_episodes(out, episodes)
        assert p.poll() is None  # still rolling out: the pause meets requests in flight
        assert httpx.post(server.url + "/pause", params={"mode": mode}, timeout=300).status_code == 200
        assert httpx.get(server.url + "/is_paused").json() == {"is_paused": True}
        time.sleep(2.0)  # requests meanwhile wait (503, retried; or held by vLLM: keep)
        assert httpx.post(server.url + "/resume").status_code == 200
    recs = every_episode_once(p, out)
    assert all(x["finish"] != "error" for x in recs), [x.get("error") for x in recs]
    assert trajectories_gap(models["a"], recs) <= GAP_BOUND


def test_a_push_under_load_loses_and_repeats_no_episode(server, models, tasks, root):
    """A push while episodes are in flight: vLLM pauses (in-flight requests finish), reloads
    and resumes; every episode comes back once, none fails, and the versions each episode saw
    never go backwards. Episodes that straddle the push carry both versions."""
    load(server.url, models["a"])
    v0 = httpx.get(server.url + "/health").json()["weight_version"]
    out = root / "pushed.jsonl"
    p = rollout_in_background(server.url, tasks, out, "--max-turns", "2", "--max-new-tokens", "48", "--seed", "3",
                              "--max-inflight", "3")
    wait_for_episodes(out, 2)
    assert p.poll() is None  # still rolling out: the push meets requests in flight
    res = load(server.url, models["b"])  # proven by the probe (<= the bound)
    assert res["weight_version"] == v0 + 1
    recs = every_episode_once(p, out)
    assert all(x["finish"] != "error" for x in recs), [x.get("error") for x in recs]
    for x in recs:
        seen = x["policy"].get("weight_versions") or [x["policy"]["weight_version"]]
        assert seen == sorted(seen) and set(seen) <= {v0, v0 + 1}, seen
    assert {x["policy"]["weight_version"] for x in recs} <= {v0, v0 + 1}
    assert_serves(server.url, models["b"], models["a"])
    load(server.url, models["a"])  # as the next tests expect


def test_load_and_push_switch_untied_weights_exactly(untied, models, root):
    load(untied.url, models["ub"])
    assert_serves(untied.url, models["ub"], models["ua"])
    batch = H.write_batch(models["ua"], root / "ubatch.jsonl", [1.0, -1.0], image_dir=root)
    r = run("update", batch, "--policy", models["ua"], "--out", root / "uc", "--lr", "1e-3", "--push", untied.url)
    assert r.returncode == 0, r.stderr
    assert_serves(untied.url, root / "uc", models["ub"])


def test_a_server_killed_mid_rollout_fails_only_its_own_episodes(untied, models, tasks, root):
    """The vLLM server dies mid-rollout; an hf server of the same checkpoint carries the rest."""
    from mars_cli.serve.app import App
    from mars_cli.serve.hf_backend import HFBackend
    from mars_cli.serve.run import in_thread

    ck = copy(root / "uc", root / "uc-hf")  # the same files: the same fingerprint
    load(untied.url, ck)
    out = root / "killed.jsonl"
    with in_thread(App(HFBackend(seed=0), allow_load=str(root), max_images=4, max_image_bytes=1 << 20), str(ck)) as hf:
        # 2 at a time, so episodes still start after the pause: the least busy server, vLLM,
        # gets them and holds them (mode keep), and dies with episodes of its own in flight
        p = rollout_in_background(f"{untied.url},{hf}", tasks, out, "--max-turns", "3", "--max-new-tokens", "24",
                                  "--seed", "2", "--max-error-rate", "1", "--max-inflight", "2")
        wait_for_episodes(out, 1)
        assert httpx.post(untied.url + "/pause", params={"mode": "keep"}).status_code == 200
        time.sleep(1.5)
        assert p.poll() is None
        untied.kill()
        recs = every_episode_once(p, out)
    failed = [x for x in recs if x["finish"] == "error"]
    assert failed and all(x["error"].startswith(untied.url) for x in failed), [x["error"] for x in failed]
    assert len(failed) < len(recs)  # the hf server's episodes, and the vLLM one's before it died, stand
