"""The engine contract for the hf engine (tiny model, CPU) and the vLLM adapter.

The vLLM adapter is tested against STAND-IN objects that mimic vLLM's LLM /
RequestOutput / CompletionOutput / Logprob types and its `vllm.inputs.TokensPrompt` and
`SamplingParams` (vLLM cannot be installed here); a `gpu` test runs the real thing.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass

import pytest

from helpers_rollout import make_image
from mars_cli import protocol
from mars_cli.engines import GenRequest, Sampling, open_engine
from mars_cli.errors import UsageError
from mars_cli.records import make_task


@pytest.fixture(scope="module")
def hf_engine(tiny_policy_dir):
    return open_engine("hf", policy=str(tiny_policy_dir), sampling=Sampling(temperature=1.0, seed=0))


def prompt(engine, tmp_path, q="What is this?", size=(112, 84)):
    img = make_image(tmp_path / f"img{size[0]}.jpg", size=size)
    msgs = protocol.initial_messages(make_task("t", q, images=[img]))
    return engine.renderer.render(msgs)


def test_hf_contract_and_logprobs_match_a_forward_pass(hf_engine, tmp_path):
    from mars_cli.models.logprobs import token_logprobs

    ids, _, images = prompt(hf_engine, tmp_path)
    short = ids[:40] + hf_engine.renderer.generation_prompt()
    reqs = [GenRequest(ids=ids, images=images, max_new_tokens=6), GenRequest(ids=short, images=[], max_new_tokens=3)]
    res = hf_engine.generate(reqs)
    assert len(res) == 2
    for req, r in zip(reqs, res):
        assert 1 <= len(r.ids) <= req.max_new_tokens and len(r.logprobs) == len(r.ids)
        assert r.finish == ("stop" if r.ids[-1] == hf_engine.special["im_end"] else "length")
        assert all(math.isfinite(x) and x <= 0 for x in r.logprobs)
        body = r.ids[:-1] if r.finish == "stop" else r.ids
        assert r.text == hf_engine.decode(body)
    # at T = 1 the stored log-probs are the policy's: a forward pass over prompt + sample agrees
    lps = token_logprobs(hf_engine.policy, [(req.ids + r.ids, req.images) for req, r in zip(reqs, res)])
    for req, r, lp in zip(reqs, res, lps):
        got = lp[len(req.ids):].tolist()
        assert got == pytest.approx(r.logprobs, abs=2e-3)
    assert hf_engine.image_tokens(images[0]) > 1
    assert hf_engine.describe()["fingerprint"] and hf_engine.describe()["trainable"] is True


def test_hf_keeps_no_per_step_logits_and_micro_batches_async_requests(hf_engine, tmp_path, monkeypatch):
    """Memory must not grow with tokens × vocabulary: generate is never asked for its logits."""
    import asyncio

    seen, batches = [], []
    model = hf_engine.policy.model
    real = model.generate

    def spy(*a, **kw):
        seen.append({k: kw.get(k) for k in ("output_logits", "output_scores")})
        out = real(*a, **kw)
        assert getattr(out, "logits", None) is None and getattr(out, "scores", None) is None
        batches.append(out.sequences.shape[0])
        return out

    monkeypatch.setattr(model, "generate", spy)
    ids, _, images = prompt(hf_engine, tmp_path)

    async def many():  # requests pending at one moment share one generate call
        return await asyncio.gather(*(hf_engine.agenerate(GenRequest(ids=ids, images=images, max_new_tokens=3))
                                      for _ in range(3)))

    res = asyncio.run(many())
    assert len(res) == 3 and all(len(r.logprobs) == len(r.ids) >= 1 for r in res)
    assert batches == [3] and all(not v for d in seen for v in d.values())


def test_hf_temperature_and_greedy(tiny_policy_dir, hf_engine, tmp_path):
    ids, _, images = prompt(hf_engine, tmp_path)
    greedy = open_engine("hf", policy=None, sampling=Sampling(temperature=0), loaded=hf_engine.policy)
    a = greedy.generate([GenRequest(ids=ids, images=images, max_new_tokens=4)])[0]
    b = greedy.generate([GenRequest(ids=ids, images=images, max_new_tokens=4)])[0]
    assert a.ids == b.ids and a.logprobs == pytest.approx(b.logprobs)
    hot = open_engine("hf", policy=None, sampling=Sampling(temperature=2.0, seed=1), loaded=hf_engine.policy)
    r = hot.generate([GenRequest(ids=ids, images=images, max_new_tokens=3)])[0]
    # log softmax(logits / 2) of the sampled ids, checked from an independent forward pass
    import torch

    from mars_cli.models.inputs import build_inputs

    batch = build_inputs(hf_engine.policy, [(ids + r.ids, images)])
    with torch.inference_mode():
        logits = hf_engine.policy.model(**batch.tensors).logits[0].float()
    pos = batch.positions[0]
    want = [torch.log_softmax(logits[pos[len(ids) + i] - 1] / 2.0, -1)[t].item() for i, t in enumerate(r.ids)]
    assert r.logprobs == pytest.approx(want, abs=2e-3)


def test_vision_placeholders_are_never_sampled_but_logprobs_stay_the_models(tiny_policy_dir, tmp_path):
    """A weak policy that puts most mass on <|image_pad|> still never emits it (it would claim an image)."""
    import torch

    from mars_cli.engines import never_sampled
    from mars_cli.models.logprobs import token_logprobs
    from mars_cli.models.load import load_policy

    policy = load_policy(tiny_policy_dir)
    banned = never_sampled(policy.special)
    assert banned == sorted({policy.special["image_pad"], policy.special["vision_start"], policy.special["vision_end"]})
    head = policy.model.lm_head
    bias = torch.zeros(head.out_features)
    bias[banned] = 30.0  # the banned tokens take nearly all the probability
    # A bias in the output layer itself (not a hook on its output): token_logprobs runs that
    # layer as one fused log-prob node, which reads the layer's weight and bias.
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        eng = open_engine("hf", policy=None, sampling=Sampling(temperature=1.0, seed=3), loaded=policy)
        ids, _, images = prompt(eng, tmp_path)
        for sampling in (Sampling(temperature=1.0, seed=3), Sampling(temperature=0)):
            eng = open_engine("hf", policy=None, sampling=sampling, loaded=policy)
            r = eng.generate([GenRequest(ids=ids, images=images, max_new_tokens=8)])[0]
            assert len(r.ids) == 8 and not set(r.ids) & set(banned)
            # the recorded log-probs are the model's own (no renormalisation over allowed tokens)
            lp = token_logprobs(policy, [(ids + r.ids, images)])[0][len(ids):].tolist()
            assert r.logprobs == pytest.approx(lp, abs=2e-3) and max(r.logprobs) < -10
    finally:
        head.bias = None


def test_sampling_validation_and_unknown_engine():
    with pytest.raises(UsageError):
        Sampling(top_p=0)
    with pytest.raises(UsageError):
        open_engine("nope")


# --- vLLM: stand-in types (NOT vLLM) mimicking its documented offline API ----------------

@dataclass
class StandInLogprob:  # vllm.sequence.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class StandInCompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None


@dataclass
class StandInRequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    prompt_token_ids: list
    outputs: list


class StandInSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class StandInLLM:
    """Replies with fixed continuations; records what it was given."""

    def __init__(self, replies):
        self.replies = replies
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            toks, finish = self.replies[i % len(self.replies)]
            toks = toks[: sp.max_tokens]
            lps = [{t: StandInLogprob(-0.25 * (j + 1), 1)} for j, t in enumerate(toks)]
            outs.append(StandInRequestOutput(str(i), p["prompt_token_ids"], [
                StandInCompletionOutput(0, "", toks, sum(x[t].logprob for x, t in zip(lps, toks)), lps, finish)]))
        return outs


@pytest.fixture
def standin_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.SamplingParams = StandInSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict  # a TypedDict in vLLM: a plain dict at runtime
    mod.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return mod


def test_vllm_adapter_against_standin(standin_vllm, tiny_policy_dir, tmp_path):
    from PIL import Image

    tok_ids = [9707, 11, 1879]
    llm = StandInLLM([(tok_ids + [151645], "stop"), (tok_ids * 5, "length")])
    eng = open_engine("vllm", policy=str(tiny_policy_dir), sampling=Sampling(temperature=0.7, top_k=5), llm=llm)
    ids, _, images = prompt(eng, tmp_path)
    res = eng.generate([GenRequest(ids=ids, images=images, max_new_tokens=50), GenRequest(ids=ids[:30], max_new_tokens=7)])
    (prompts, params), = llm.calls
    assert prompts[0]["prompt_token_ids"] == ids and ids.count(eng.special["image_pad"]) == 1
    assert isinstance(prompts[0]["multi_modal_data"]["image"][0], Image.Image)
    assert "multi_modal_data" not in prompts[1]
    p = params[0]
    assert p.logprobs == 0 and p.temperature == 0.7 and p.top_k == 5 and p.max_tokens == 50
    assert p.stop_token_ids == [eng.special["im_end"], eng.special["pad"]] and params[1].max_tokens == 7  # generation_config
    assert p.logit_bias == {t: -100.0 for t in (eng.special["vision_start"], eng.special["vision_end"], eng.special["image_pad"])}
    a, b = res
    assert a.ids == tok_ids + [151645] and a.finish == "stop" and a.logprobs == [-0.25, -0.5, -0.75, -1.0]
    assert a.text == eng.decode(tok_ids)
    assert len(b.ids) == 7 and b.finish == "length"
    # image tokens: the processor's patch count of the smart-resized image
    from mars_cli.models.load import load_policy
    from mars_cli.models.inputs import image_tokens

    assert eng.image_tokens(images[0]) == image_tokens(load_policy(tiny_policy_dir), images[0])


@pytest.mark.gpu
def test_vllm_real(tiny_policy_dir, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm")
    eng = open_engine("vllm", policy=str(tiny_policy_dir), sampling=Sampling(seed=0), gpu_memory_utilization=0.3)
    ids, _, images = prompt(eng, tmp_path)
    [r] = eng.generate([GenRequest(ids=ids, images=images, max_new_tokens=8)])
    assert 1 <= len(r.ids) <= 8 and len(r.logprobs) == len(r.ids)
    assert all(math.isfinite(x) and x <= 0 for x in r.logprobs)


def test_hf_qwen3_vl(tiny_qwen3_dir, tmp_path):
    from mars_cli.models.logprobs import token_logprobs

    eng = open_engine("hf", policy=str(tiny_qwen3_dir), sampling=Sampling(seed=0))
    ids, _, images = prompt(eng, tmp_path, size=(128, 96))
    [r] = eng.generate([GenRequest(ids=ids, images=images, max_new_tokens=4)])
    [lp] = token_logprobs(eng.policy, [(ids + r.ids, images)])
    assert lp[len(ids):].tolist() == pytest.approx(r.logprobs, abs=2e-3)


def test_a_turn_ends_at_the_checkpoints_own_end_ids_as_in_vllm(tiny_policy_dir, tmp_path):
    """vLLM (its chat server and its token route: see the vllm tier) and SGLang (verl's rollout
    engine, and the chat server the official serve_model.sh starts for inference/eval.py)
    end a reply at any end-of-sequence id of the checkpoint's config and generation config,
    Qwen-VL's <|endoftext|> as well as <|im_end|>, whatever the request's stop ids; so does
    the hf engine, under every profile. A checkpoint whose generation config names
    <|im_end|> alone runs on."""
    import json

    from helpers_rollout import always_emits
    from mars_cli.engines import cut_at_stop
    from mars_cli.models.load import end_ids, load_policy

    eot = 151643
    ck = always_emits(tiny_policy_dir, tmp_path / "eot", eot)
    assert end_ids(ck) == [151645, eot]  # config.json: <|im_end|>; generation_config.json: both
    policy = load_policy(ck)
    eng = open_engine("hf", policy=None, sampling=Sampling(temperature=0), loaded=policy)
    ids, _, images = prompt(eng, tmp_path)
    r = eng.generate([GenRequest(ids=ids, images=images, max_new_tokens=8)])[0]
    assert r.ids == [eot] and r.finish == "stop" and r.text == ""
    gen = json.loads((ck / "generation_config.json").read_text())
    (ck / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 151645}))
    policy = load_policy(ck)
    assert policy.end_ids == [151645]
    plain = open_engine("hf", policy=None, sampling=Sampling(temperature=0), loaded=policy)
    r = plain.generate([GenRequest(ids=ids, images=images, max_new_tokens=8)])[0]
    assert r.ids == [eot] * 8 and r.finish == "length"
    assert cut_at_stop([5, 7, 9, 7], [9]) == ([5, 7, 9], [5, 7]) and cut_at_stop([1, 2], [9]) == ([1, 2], [1, 2])
