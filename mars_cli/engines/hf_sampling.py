"""One batched transformers `generate` turn, with each sampled token's log-prob taken as it goes.

Shared by the `hf` engine and `mars serve --engine hf`. The log-prob stored for a token is
log softmax(raw logits / T)[token] (T = 1 when greedy): the distribution defined in
mars_cli.engines, taken before top-k/top-p, before the presence penalty and before the
vision placeholders are suppressed, so at T = 1 it equals a forward pass's log π.

Memory: `output_logits=True` would keep every step's full-vocabulary logits (about 1.2 GB
for a 2,048-token turn with Qwen's 152k vocabulary). Instead one logits processor, first
in generate's chain, keeps only the current step's log-softmax; at the next step the
token just sampled is the last input id, so it gathers that one value and drops the row.
"""

from __future__ import annotations

from dataclasses import dataclass

from mars_cli.engines import Sampling, never_sampled, strip_eos


@dataclass
class Turn:
    """One generated turn: the sampled ids (ending in <|im_end|> when it stopped), their log-probs."""

    ids: list[int]
    logprobs: list[float]
    finish: str  # "stop" or "length"
    text_ids: list[int]  # ids without the end-of-turn token (what `decode` shows)


def recorder(temperature: float, suppress: list[int], presence_penalty: float, prompt_len: int):
    """A LogitsProcessor that records sampled log-probs, then suppresses ids and applies the presence penalty."""
    import torch
    from transformers import LogitsProcessor

    class SampledLogprobs(LogitsProcessor):
        def __init__(self):
            self.pending = None  # (batch, vocab) log-softmax of the step whose token is not known yet
            self.columns: list = []  # (batch,) log-prob of each sampled token so far
            self.suppress = torch.tensor(suppress, dtype=torch.long) if suppress else None

        def take(self, sampled) -> None:
            if self.pending is not None:
                self.columns.append(self.pending.gather(-1, sampled[:, None].to(self.pending.device)).squeeze(-1))
                self.pending = None

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > prompt_len:
                self.take(input_ids[:, -1])
            x = scores.float()
            if temperature != 1.0:
                x = x / temperature
            self.pending = torch.log_softmax(x, dim=-1)
            if self.suppress is not None:
                scores = scores.index_fill(-1, self.suppress.to(scores.device), float("-inf"))
            if presence_penalty and input_ids.shape[1] > prompt_len:
                gen = input_ids[:, prompt_len:]
                seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, gen, True)
                scores = scores - presence_penalty * seen.to(scores.dtype)
            return scores

        def result(self, sequences):
            """(batch, steps) log-probs once generate returned `sequences`."""
            if sequences.shape[1] > prompt_len + len(self.columns):
                self.take(sequences[:, -1])
            return torch.stack(self.columns, dim=1) if self.columns else torch.zeros(sequences.shape[0], 0)

    return SampledLogprobs()


def generate_turns(policy, items: list[tuple[list[int], list]], sampling: Sampling,
                   max_new_tokens: list[int]) -> list[Turn]:
    """Continue each (prompt ids with one image_pad per image, images) by one assistant turn.

    `images` are paths or PIL images. One left-padded `generate` for the whole list; each
    turn is cut at its own <|im_end|> or its own `max_new_tokens`.
    """
    import torch
    from transformers import LogitsProcessorList

    from mars_cli.models.inputs import build_inputs

    batch = build_inputs(policy, items, pad_side="left")
    tensors = {k: (v.to(policy.device) if hasattr(v, "to") else v) for k, v in batch.tensors.items()}
    prompt_len = tensors["input_ids"].shape[1]
    s = sampling
    special = policy.special
    rec = recorder(s.temperature if not s.greedy else 1.0, never_sampled(special), s.presence_penalty, prompt_len)
    # Explicit values override a checkpoint's generation_config.json (released Qwen-VL
    # configs set a repetition penalty and near-greedy top-k/top-p), so the sampling is
    # exactly what `policy.sampling` in the record says.
    kwargs = dict(max_new_tokens=max(max_new_tokens), do_sample=not s.greedy, return_dict_in_generate=True,
                  eos_token_id=special["im_end"], pad_token_id=special["pad"], repetition_penalty=1.0,
                  logits_processor=LogitsProcessorList([rec]))
    if not s.greedy:
        kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    with torch.inference_mode():
        gen = policy.model.generate(**tensors, **kwargs)
    new = gen.sequences[:, prompt_len:]
    picked = rec.result(gen.sequences)
    eos = special["im_end"]
    turns = []
    for b, limit in enumerate(max_new_tokens):
        ids = new[b].tolist()
        stop = min(ids.index(eos) + 1 if eos in ids else len(ids), limit)
        ids = ids[:stop]
        body, ended = strip_eos(ids, eos)
        turns.append(Turn(ids=ids, logprobs=picked[b, :stop].tolist(), finish="stop" if ended else "length",
                          text_ids=body))
    return turns
