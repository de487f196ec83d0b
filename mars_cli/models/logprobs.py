"""Per-token log-probs of stored token ids: one forward, the vocabulary projection on scored rows only.

    token_logprobs(policy, [(ids, images), ...], masks=...) -> [tensor of len(ids)] per sequence

The trainer (update's old and new log-probs, sft), the tests' independent references and
the push probe (serve.probe: a server's log-probs against the trainer's forward pass)
all score tokens here, so "the log-prob of a token" has one definition: log softmax of
the logits at temperature 1 over the whole vocabulary, the distribution mars_cli.engines
defines. Inputs come from models.inputs.build_inputs (placeholders expanded), and the
answer is aligned to the stored ids.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

from mars_cli.errors import MarsError
from mars_cli.models.inputs import Batch, build_inputs


def unwrap_model(model):
    """The transformers model inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module") and not hasattr(model, "lm_head"):
        model = model.module
    return model


def _forward_of(net):
    """What a training forward calls: the DeepSpeed engine around `net` when it has one.

    The engine's forward is where ZeRO-3 counts micro-steps: a forward that bypasses it
    makes each micro-batch's gradient overwrite the previous one's instead of adding up.
    rl.engine.Trainer leaves a weak reference to its engine on the module it wraps.
    """
    ref = getattr(net, "ds_engine_ref", None)
    engine = ref() if ref is not None else None
    return engine if engine is not None else net


def _scored(batch: Batch, seqs, masks, dev):
    """Which (row, expanded position) of the hidden states score which stored token.

    Returns (rows, cols, targets, spans): the logits at expanded position p−1 score the
    token at p; `spans[b]` = (the stored indices of sequence b that are scored, their
    slice of the flat arrays).
    """
    import torch

    rows, cols, targets, spans = [], [], [], []
    at = 0
    for b, (ids, _images) in enumerate(seqs):
        n = len(ids)
        want = torch.arange(1, n, device=dev)
        if masks is not None:
            m = torch.as_tensor(list(masks[b]), device=dev)
            if len(m) != n:
                raise MarsError(f"sequence {b}: mask has {len(m)} entries for {n} ids")
            want = want[m[1:] != 0]
        rows.append(torch.full((len(want),), b, dtype=torch.long, device=dev))
        cols.append(batch.positions[b].to(dev)[want] - 1)
        targets.append(torch.as_tensor(list(ids), dtype=torch.long, device=dev)[want])
        spans.append((want, slice(at, at + len(want))))
        at += len(want)
    return torch.cat(rows), torch.cat(cols), torch.cat(targets), spans


@contextlib.contextmanager
def _head_as(head, forward):
    """Run `forward` as the output projection's forward (an instance attribute shadows the class's)."""
    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def token_logprobs(policy, seqs, *, pad_side: str = "right", grad: bool = False, model=None,
                   masks: Sequence[Sequence[int]] | None = None, batch: Batch | None = None) -> list:
    """Per sequence, log p(ids[i] | ids[:i]) at every stored index (index 0 → 0.0).

    Computed from one forward of the expanded input: the logits at expanded position p−1
    score the token at p. With `masks`, only indices whose mask is 1 are scored (the rest
    are 0.0), which skips the vocabulary projection for prompt and tool tokens. `model`
    overrides policy.model (a DeepSpeed engine's module, for training).

    The forward goes through the model's own top-level forward with the output projection
    replaced, for this call, by models.vocab.VocabLogprob on the scored rows: the full
    (batch × length × vocabulary) logits never exist, the projection runs once per call
    whatever the number of rows, and DeepSpeed's hooks on the top-level module (ZeRO-3's
    step reset and prefetch) and on the projection (one gather) run as in any forward.
    This relies on the top-level forward returning the projection's output unchanged as
    `logits`, as Qwen2.5-VL and Qwen3-VL do (no soft-capping or scaling after it).
    """
    import torch

    from mars_cli.models.vocab import VocabLogprob

    net = unwrap_model(model if model is not None else policy.model)
    if batch is None:
        batch = build_inputs(policy, seqs, pad_side=pad_side)
    dev = next(net.parameters()).device
    tensors = {k: v.to(dev) for k, v in batch.tensors.items()}
    rows, cols, targets, spans = _scored(batch, seqs, masks, dev)
    head = net.get_output_embeddings()

    def project(hidden):
        return VocabLogprob.apply(hidden[rows, cols], head.weight, head.bias, targets)

    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx, _head_as(head, project):
        flat = _forward_of(net)(**tensors, use_cache=False, logits_to_keep=0).logits
    # Every sequence stays connected to the projection's output (even with nothing
    # scored), so every rank runs the same backward.
    return [torch.zeros(len(ids), dtype=torch.float32, device=dev).index_put((want,), flat[part])
            for (ids, _images), (want, part) in zip(seqs, spans)]
