"""The `hf` engine: transformers `generate`, batched with left padding, on CPU or GPU.

Inputs are built by the model layer (models.inputs.build_inputs), which expands each
image's single placeholder to the processor's patch count. Generation stops at
<|im_end|> (or a profile's extra stop tokens) or max_new_tokens. Log-probs: log softmax(logits / T)[sampled token], T the
sampling temperature (T = 1 when greedy), from the model's raw logits of each step. That is
the distribution defined in mars_cli.engines: at T = 1 it equals a forward pass's
log π(token | prefix).

Memory: keeping every step's logits (`output_logits=True`) holds steps × batch × vocabulary
floats, about 1.2 GB for one 2,048-token turn with Qwen's 152k vocabulary. Instead the
first logits processor (`SampledLogprobs`) sees each step's raw logits, keeps ONE
log-softmax row per sequence, and at the next step, when the token drawn from that row is
the last column of `input_ids`, keeps only its value. Memory stays batch × vocabulary.
Vision tokens are suppressed by a processor placed after it, so the recorded values stay
the model's own (generate's built-in `suppress_tokens` would run first).
"""

from __future__ import annotations

from mars_cli.engines import Engine, GenRequest, GenResult, Sampling, cut_at_stop, never_sampled, stop_ids
from mars_cli.errors import MarsError


def _presence_processor(penalty: float, prompt_len: int):
    """Subtract `penalty` from the logits of tokens already generated (vLLM's presence penalty)."""
    import torch
    from transformers import LogitsProcessor

    class PresencePenalty(LogitsProcessor):
        def __call__(self, input_ids, scores):
            gen = input_ids[:, prompt_len:]
            if gen.shape[1] == 0:
                return scores
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, gen, True)
            return scores - penalty * seen.to(scores.dtype)

    return PresencePenalty()


def _sampled_logprobs_processor(temperature: float):
    """A LogitsProcessor recording log softmax(raw logits / T)[sampled id], one row in memory."""
    import torch
    from transformers import LogitsProcessor

    class SampledLogprobs(LogitsProcessor):
        def __init__(self):
            self.row = None  # (batch, vocab) log-probs of the step whose token is not drawn yet
            self.cols: list = []

        def take(self, chosen) -> None:
            self.cols.append(self.row.gather(-1, chosen.view(-1, 1)).squeeze(-1))
            self.row = None

        def __call__(self, input_ids, scores):
            if self.row is not None:  # the previous step's token is now the last input id
                self.take(input_ids[:, -1])
            x = scores.float()
            if temperature != 1.0:
                x = x / temperature
            self.row = torch.log_softmax(x, dim=-1)
            return scores

        def finish(self, sequences):
            """(batch, steps) for the generated part; the last drawn token closes the last row."""
            if self.row is not None:
                self.take(sequences[:, -1])
            return torch.stack(self.cols, dim=1)

    return SampledLogprobs()


def _suppress_processor(ids: list[int]):
    """Never sample `ids` (after the log-probs were recorded from the raw logits)."""
    from transformers import LogitsProcessor

    class Suppress(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, ids] = float("-inf")
            return scores

    return Suppress()


class HFEngine(Engine):
    name = "hf"
    tokens = True

    def __init__(self, policy, *, sampling: Sampling, device: str = "cpu", dtype=None, max_batch: int = 16,
                 min_pixels: int | None = None, max_pixels: int | None = None, loaded=None,
                 attn_implementation: str | None = None):
        from mars_cli.models.load import load_policy
        from mars_cli.protocol import Renderer

        if loaded is None:
            if not policy:
                raise MarsError("the hf engine needs --policy (a model directory)")
            loaded = load_policy(policy, device=device, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels,
                                 attn_implementation=attn_implementation)
        self.policy = loaded
        self.path = str(loaded.path)
        self.fingerprint = loaded.fingerprint
        self.sampling = sampling
        self.special = loaded.special
        self.stop = stop_ids(self.special, loaded.end_ids)
        self.renderer = Renderer(loaded.tokenizer, loaded.special)
        self.max_batch = max(1, max_batch)
        size = getattr(loaded.image_processor, "size", None) or {}
        if "shortest_edge" in size and "longest_edge" in size:
            self.pixels = {"min": int(size["shortest_edge"]), "max": int(size["longest_edge"])}
        self.image_factor = int(loaded.image_processor.patch_size) * int(loaded.image_processor.merge_size)
        if sampling.seed is not None:
            import torch

            torch.manual_seed(sampling.seed)

    def image_tokens(self, image: str) -> int:
        from mars_cli.models.inputs import image_tokens

        return int(image_tokens(self.policy, image))

    def generate(self, requests: list[GenRequest], stop_rows=None) -> list[GenResult]:
        """One turn per request. `stop_rows()`, when given, is asked after every token which
        rows to end now (a list of bools, one per request): an ended row comes back "abort"."""
        out: list[GenResult] = []
        for i in range(0, len(requests), self.max_batch):
            rows = None if stop_rows is None else (lambda i=i: stop_rows()[i:i + self.max_batch])
            out.extend(self._generate(requests[i:i + self.max_batch], rows))
        return out

    def _generate(self, requests: list[GenRequest], stop_rows=None) -> list[GenResult]:
        import torch
        from transformers import LogitsProcessorList

        from mars_cli.models.inputs import build_inputs

        batch = build_inputs(self.policy, [(r.ids, r.images) for r in requests], pad_side="left")
        tensors = {k: (v.to(self.policy.device) if hasattr(v, "to") else v) for k, v in batch.tensors.items()}
        prompt_len = tensors["input_ids"].shape[1]
        s = self.sampling
        max_new = max(r.max_new_tokens for r in requests)
        # Explicit values override a checkpoint's generation_config.json (released Qwen-VL
        # configs set a repetition penalty and near-greedy top-k/top-p), so the sampling is
        # exactly what `policy.sampling` in the record says.
        recorder = _sampled_logprobs_processor(s.temperature if not s.greedy else 1.0)
        processors = [recorder, _suppress_processor(never_sampled(self.special))]
        if s.presence_penalty:
            processors.append(_presence_processor(s.presence_penalty, prompt_len))
        kwargs = dict(max_new_tokens=max_new, do_sample=not s.greedy, return_dict_in_generate=True,
                      eos_token_id=self.stop, pad_token_id=self.special["pad"], repetition_penalty=1.0,
                      logits_processor=LogitsProcessorList(processors))
        if not s.greedy:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        aborted: dict[int, int] = {}  # row -> tokens it had when it was ended
        if stop_rows is not None:
            from transformers import StoppingCriteria, StoppingCriteriaList

            class _Rows(StoppingCriteria):
                def __call__(self, input_ids, scores, **kw):
                    for b, stop in enumerate(stop_rows()):
                        if stop and b not in aborted:
                            aborted[b] = input_ids.shape[1] - prompt_len
                    return torch.tensor([b in aborted for b in range(input_ids.shape[0])], dtype=torch.bool,
                                        device=input_ids.device)

            kwargs["stopping_criteria"] = StoppingCriteriaList([_Rows()])
        with torch.inference_mode():
            gen = self.policy.model.generate(**tensors, **kwargs)
        new = gen.sequences[:, prompt_len:]
        picked = recorder.finish(gen.sequences)
        results = []
        stops = self.stop
        for b, req in enumerate(requests):
            ids = new[b].tolist()
            stop = len(cut_at_stop(ids, stops)[0])
            stop = min(stop, req.max_new_tokens, aborted.get(b, len(ids)))
            ids = ids[:stop]
            finish = "stop" if ids and ids[-1] in stops else "abort" if b in aborted else "length"
            body = ids[:-1] if ids and ids[-1] in stops else ids
            results.append(GenResult(text=self.decode(body), ids=ids, logprobs=picked[b, :stop].tolist(), finish=finish))
        return results
