"""The objectives against hand-written closed forms: values, gradients, packing invariance."""

import math

import pytest
import torch

from mars_cli.rl import loss as L


def _toy():
    # Two sequences of different lengths; padding positions carry garbage to prove the mask works.
    logp = torch.tensor([[-1.0, -0.5, -2.0, 9.0], [-0.3, -0.2, 7.0, 7.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0002, -0.4999, -2.0001, 0.0], [-0.2, -0.25, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = torch.tensor([1.5, -0.7], dtype=torch.float64)
    return logp, old, mask, adv


def test_gspo_value_and_gradient_match_closed_form():
    logp, old, mask, adv = _toy()
    el, eh = 3e-4, 4e-4
    out = L.gspo(logp, old, adv, mask, eps_low=el, eps_high=eh, denom=2)
    out.loss.backward()
    expect = 0.0
    grad = torch.zeros_like(logp)
    clipped = 0
    for i in range(2):
        n = int(mask[i].sum())
        s = math.exp(sum(float(logp.detach()[i, t] - old[i, t]) for t in range(n)) / n)
        a = float(adv[i])
        sc = min(max(s, 1 - el), 1 + eh)
        expect += -min(s * a, sc * a) / 2
        if s * a <= sc * a:  # unclipped: d(-s·A)/d logp_t = -A·s/n
            for t in range(n):
                grad[i, t] = -a * s / n / 2
        else:
            clipped += 1
    assert out.loss.item() == pytest.approx(expect, rel=1e-12)
    assert torch.allclose(logp.grad, grad, atol=1e-12)
    # Sequence 1: s = exp(-0.05/2... ) < 1 - eps with A < 0 → clipped; sequence 0 in range.
    assert out.stats["clipped"] == clipped == 1
    assert out.stats["n"] == 2


def test_gspo_token_form_has_the_same_value_and_gradient():
    # The paper's GSPO-token form: s_t = sg[s]·π(y_t)/sg[π(y_t)], averaged over tokens.
    logp, old, mask, adv = _toy()
    out = L.gspo(logp, old, adv, mask, eps_low=0.1, eps_high=0.1, denom=1)
    out.loss.backward()
    g1 = logp.grad.clone()
    logp2 = logp.detach().clone().requires_grad_(True)
    m = mask.double()
    s = torch.exp(((logp2 - old) * m).sum(1) / m.sum(1)).detach()
    st = s[:, None] * torch.exp(logp2 - logp2.detach())
    a = adv[:, None]
    per = -torch.minimum(st * a, torch.clamp(st, 0.9, 1.1) * a)
    tok = ((per * m).sum(1) / m.sum(1)).sum()
    tok.backward()
    assert tok.item() == pytest.approx(out.loss.item(), rel=1e-12)
    assert torch.allclose(g1, logp2.grad, atol=1e-12)


def test_gspo_kl_term_is_k3_averaged_per_sequence():
    logp, old, mask, adv = _toy()
    ref = logp.detach() - 0.1
    out = L.gspo(logp, old, adv, mask, ref=ref, beta=0.5, eps_low=1.0, eps_high=1.0, denom=2)
    base = L.gspo(logp, old, adv, mask, eps_low=1.0, eps_high=1.0, denom=2)
    k = math.exp(-0.1) + 0.1 - 1  # every token has the same log-ratio
    assert (out.loss - base.loss).item() == pytest.approx(0.5 * k, rel=1e-9)
    assert out.stats["kl_sum"] == pytest.approx(2 * k, rel=1e-9)


def test_k3_is_nonnegative_and_zero_at_equality():
    x = torch.linspace(-3, 3, 13)
    assert torch.all(L.k3(x, x) == 0)
    assert torch.all(L.k3(x, x + 0.3) > 0) and torch.all(L.k3(x, x - 0.3) > 0)


def test_grpo_matches_a_token_loop():
    logp, old, mask, adv = _toy()
    out = L.grpo(logp, old, adv, mask, denom=5)
    out.loss.backward()
    expect, grad = 0.0, torch.zeros_like(logp)
    for i in range(2):
        for t in range(int(mask[i].sum())):
            r = math.exp(float(logp.detach()[i, t] - old[i, t]))
            a = float(adv[i])
            rc = min(max(r, 0.8), 1.28)
            expect += -min(r * a, rc * a) / 5
            if r * a <= rc * a:
                grad[i, t] = -a * r / 5
    assert out.loss.item() == pytest.approx(expect, rel=1e-12)
    assert torch.allclose(logp.grad, grad, atol=1e-12)
    assert out.stats["n"] == 5


@pytest.mark.parametrize("name", ["gspo", "grpo"])
def test_sum_over_micro_batches_does_not_depend_on_packing(name):
    torch.manual_seed(0)
    B, T = 5, 7
    logp = (torch.randn(B, T, dtype=torch.float64) * 0.1 - 1).requires_grad_(True)
    old = logp.detach() + torch.randn(B, T, dtype=torch.float64) * 0.01
    mask = (torch.rand(B, T) > 0.3).long()
    mask[:, 0] = 1
    adv = torch.randn(B, dtype=torch.float64)
    fn = L.OBJECTIVES[name]
    denom = B if L.LEVEL[name] == "sequence" else float(mask.sum())
    kw = dict(eps_low=0.05, eps_high=0.05, denom=denom)
    whole = fn(logp, old, adv, mask, **kw)
    whole.loss.backward()
    g_whole = logp.grad.clone()
    logp.grad = None
    acc, total = {}, 0.0
    for part in ([0, 3], [1], [2, 4]):
        out = fn(logp[part], old[part], adv[part], mask[part], **kw)
        out.loss.backward()
        total += out.loss.item()
        L.merge_stats(acc, out.stats)
    assert total == pytest.approx(whole.loss.item(), rel=1e-12)
    assert torch.allclose(logp.grad, g_whole, atol=1e-14)
    assert L.reduce_stats(acc) == pytest.approx(L.reduce_stats(L.merge_stats({}, whole.stats)))


def test_nll_and_empty_sequences():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0]])
    out = L.nll(logp, mask, denom=2)
    assert out.loss.item() == pytest.approx(1.5)
    assert out.stats == {"n": 2.0, "nll_sum": 3.0}
    # A trajectory with no policy tokens contributes nothing and is not counted in the ratios.
    g = L.gspo(logp, logp.detach(), torch.tensor([1.0, 1.0]), mask, denom=2)
    assert g.stats["n"] == 1 and g.loss.item() == pytest.approx(-0.5)
    assert L.reduce_stats({}) == {"clip_fraction": 0.0, "kl": 0.0, "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}


def test_k3_is_clamped_at_ten_as_verl():
    """verl's kl_penalty("low_var_kl"): log-ratio clamped to ±20, the estimate to ±10."""
    logp = torch.tensor([0.0, 0.0, -5.0, -30.0], requires_grad=True)
    ref = torch.tensor([-1.0, 3.0, 0.0, 0.0])
    kl = L.k3(logp, ref)
    r = (ref - logp.detach()).clamp(-20, 20)
    want = (torch.exp(r) - r - 1).clamp(max=10)
    assert torch.allclose(kl, want) and float(kl.max()) == 10.0
    assert float(kl[0]) == pytest.approx(math.exp(-1) + 1 - 1)
    kl.sum().backward()
    assert logp.grad[2] == 0 and logp.grad[3] == 0 and logp.grad[0] != 0  # past the clamp: no gradient


# --- grpo-verl: the released training script's policy loss -----------------------------------

def _verl_reference(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, c=3.0):
    """verl core_algos.compute_policy_loss_vanilla restated token by token (dual clip,
    then token-mean over the micro-batch's mask), in plain Python floats."""
    import math

    total, n = 0.0, 0
    for b in range(len(adv)):
        a = float(adv[b])
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            r = math.exp(max(-20.0, min(20.0, float(logp[b, t] - old[b, t]))))
            loss = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
            if a < 0:
                loss = min(loss, -a * c)
            total += loss
            n += 1
    return total / n


def test_grpo_verl_is_verls_dual_clip_and_micro_batch_token_mean():
    from mars_cli.rl import loss as L

    torch.manual_seed(0)
    logp = torch.randn(3, 6) * 0.1 - 1.0
    old = logp.clone()
    old[0, :3] -= 2.0  # ratios of e^2 ≈ 7.4 on a negative advantage: the dual clip caps them at 3
    old[1, 2:] += 0.5
    adv = torch.tensor([-1.0, 0.7, 0.3])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    # one micro-batch of 3 trajectories in a mini-batch of 5: verl scales its token-mean by 3/5
    denom = L.loss_denominator("micro-token", 5, 999, 3, int(mask.sum()))
    out = L.OBJECTIVES["grpo-verl"](logp, old, adv, mask, denom=denom)
    assert float(out.loss) == pytest.approx(_verl_reference(logp, old, adv, mask) * 3 / 5, rel=1e-5)
    # without the dual clip (mars's grpo) the capped tokens weigh more than 3
    plain = L.grpo(logp, old, adv, mask, denom=denom)
    assert float(plain.loss) > float(out.loss)
    assert L.loss_denominator("token", 5, 40, 3, 12) == 40 and L.loss_denominator("sequence", 5, 40, 3, 12) == 5
