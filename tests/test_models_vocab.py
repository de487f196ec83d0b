"""The chunked vocabulary log-prob against a full log_softmax, values and gradients."""

from __future__ import annotations

import pytest
import torch

from mars_cli.models import vocab
from mars_cli.models.vocab import VocabLogprob


def _reference(h, w, b, t):
    return torch.log_softmax(torch.nn.functional.linear(h, w, b).double(), -1).gather(1, t[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk", [3, 256])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_match_a_full_log_softmax(monkeypatch, chunk, with_bias):
    monkeypatch.setattr(vocab, "LOGIT_CHUNK", chunk)  # 3: several row chunks, several vocabulary blocks
    g = torch.Generator().manual_seed(0)
    rows, width, V = 11, 8, 37
    h = torch.randn(rows, width, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(V, width, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if with_bias else None
    t = torch.randint(0, V, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)

    got = VocabLogprob.apply(h, w, b, t)
    assert got.dtype == torch.float32 and got.shape == (rows,)
    grads = torch.autograd.grad(got, [x for x in (h, w, b) if x is not None], upstream)
    want = _reference(h, w, b, t)
    ref_grads = torch.autograd.grad(want, [x for x in (h, w, b) if x is not None], upstream.double())
    assert torch.allclose(got.double(), want, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a.double(), r.double(), atol=1e-5, rtol=1e-5)


def test_no_rows_gives_zero_gradients():
    w = torch.randn(5, 4, requires_grad=True)
    h = torch.zeros(0, 4, requires_grad=True)
    out = VocabLogprob.apply(h, w, None, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    (out.sum() + 0.0).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_bf16_weight_gradient_matches_autograd_in_bf16():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(50, 16, generator=g).bfloat16().requires_grad_()
    t = torch.randint(0, 50, (6,), generator=g)
    got = VocabLogprob.apply(h, w, None, t)
    got.sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = -torch.nn.functional.cross_entropy(torch.nn.functional.linear(h2, w2).float(), t, reduction="none")
    want.sum().backward()
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
    assert w.grad.dtype == torch.bfloat16 and torch.allclose(w.grad.float(), w2.grad.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(h.grad.float(), h2.grad.float(), atol=2e-2, rtol=2e-2)
