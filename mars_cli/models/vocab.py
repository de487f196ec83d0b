"""log p(target | hidden) through the vocabulary projection, without a rows × vocab tensor.

    lp = VocabLogprob.apply(hidden_rows, lm_head.weight, lm_head.bias, targets)   # [rows] float32

Forward: LOGIT_CHUNK rows at a time, logits → fused cross-entropy (one log-softmax pass),
keeping only each row's log-sum-exp. Backward recomputes the logits block by block over
the vocabulary (all rows, a slice of the vocabulary), so each block of the weight's
gradient comes out of one matmul over every row (no summing of per-chunk partial
gradients in bf16) and the hidden gradient is summed in float32.

It is one autograd node that reads the weight once per forward and once per backward.
Called as the output projection's forward (see models.logprobs.token_logprobs), it makes
exactly one parameter gather per micro-batch under ZeRO-3 however many rows are scored,
so every rank issues the same collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of the vocabulary projection computed at once: bounds the float32 (rows × vocab)
# block to ~150 MB at a 152k vocabulary, large enough to keep a GPU matmul efficient.
LOGIT_CHUNK = 256


class VocabLogprob(torch.autograd.Function):
    """log_softmax(hidden · Wᵀ + b)[target] per row, in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        n = hidden.shape[0]
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(lp)
        with torch.no_grad():
            for s in range(0, n, LOGIT_CHUNK):
                logits = F.linear(hidden[s:s + LOGIT_CHUNK], weight, bias).float()
                t = targets[s:s + LOGIT_CHUNK]
                ce = F.cross_entropy(logits, t, reduction="none")
                lp[s:s + LOGIT_CHUNK] = -ce
                # −ce = logit[t] − logsumexp, so the row's log-sum-exp costs one gather.
                lse[s:s + LOGIT_CHUNK] = logits.gather(1, t[:, None]).squeeze(1) + ce
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return lp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        gh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        if n == 0:
            return (gh.to(hidden.dtype) if need_h else None), gw, gb, None
        g = grad.float()
        # Vocabulary rows per block: a block holds at most LOGIT_CHUNK × vocab logits.
        step = max(1, (LOGIT_CHUNK * vocab) // n)
        for v in range(0, vocab, step):
            w = weight[v:v + step]
            b = bias[v:v + step] if bias is not None else None
            # d lp / d logits = onehot(target) − softmax, times the incoming gradient.
            d = F.linear(hidden, w, b).float().sub_(lse[:, None]).exp_().mul_(-g[:, None])
            hit = ((targets >= v) & (targets < v + step)).nonzero().squeeze(1)
            d[hit, targets[hit] - v] += g[hit]
            if need_b:
                gb[v:v + step] = d.sum(0).to(gb.dtype)
            d = d.to(weight.dtype)
            if need_w:
                gw[v:v + step] = d.t() @ hidden
            if need_h:
                gh += d @ w
        return (gh.to(hidden.dtype) if need_h else None), gw, gb, None
