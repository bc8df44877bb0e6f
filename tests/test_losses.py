"""Tests for ihgrpo.losses: the SPEC section 4 gradient identity, GRPO/EH-GRPO limits, clipping,
aggregation, masks, the chunked path and dtypes. Everything is float64 unless the test is about dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ihgrpo.losses import (
    AGGREGATIONS,
    aggregate,
    chunked_token_stats,
    decision_c_mask,
    ih_grpo_loss,
    ih_grpo_loss_from_stats,
    token_stats_from_logits,
)

F64 = torch.float64
E = 2  # execute token id in the toy vocabularies


def _problem(B=3, T=5, V=11, seed=0, dtype=F64, log_ratio_scale=0.05):
    """Random logits/labels/advantages/mask/old logprobs with both token kinds present."""
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[labels == E] = E + 1
    labels[:, 0] = E
    labels[0, 2] = E
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[B - 1, T - 1] = False
    mask[1, 0] = False  # a masked E token
    adv = torch.randn(B, generator=g, dtype=F64)
    adv[adv.abs() < 0.1] = 0.5
    logp = torch.log_softmax(logits.to(F64), -1).gather(-1, labels[..., None]).squeeze(-1)
    old = logp + log_ratio_scale * (2 * torch.rand(B, T, generator=g, dtype=F64) - 1)
    return logits, labels, adv, mask, old


def _token_weight(mask: torch.Tensor, aggregation: str, norm_constant=None) -> torch.Tensor:
    """d aggregate / d x_t for each token: the 1/N of g = -A r / N."""
    m = mask.to(F64)
    if aggregation == "token-mean":
        return m / m.sum()
    if aggregation == "seq-mean-token-mean":
        counts = m.sum(-1, keepdim=True)
        return m / counts.clamp(min=1) / (counts > 0).sum()
    c = mask.shape[-1] if norm_constant is None else norm_constant
    return m / (c * mask.shape[0])


def _ref_grpo_loss(logits, labels, adv, mask, old, clip_low=0.2, clip_high=0.28, dual_clip=3.0):
    """Plain GRPO/DAPO token-mean loss written independently: full log-softmax, gather, PPO clip, dual clip."""
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    a = adv[:, None] if adv.dim() == 1 else adv
    r = torch.exp(logp - old)
    loss = torch.max(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
    loss = torch.where(a < 0, torch.min(loss, -a * dual_clip), loss)
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum()


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


# ------------------------------------------------------------------------------------------------
# SPEC section 4: the gradient identity, lambda = 0 (GRPO) and lambda = 1 (explicit two-level policy)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.5, 1.0])
def test_gradient_identity(lam, aggregation):
    logits, labels, adv, mask, old = _problem()
    logits.requires_grad_(True)
    loss, stats = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E, lam=lam, old_logprobs=old,
                               aggregation=aggregation)
    grad = _grad(loss, logits)
    assert stats["clip_frac"] == 0.0 and stats["dual_clip_frac"] == 0.0  # all tokens unclipped

    with torch.no_grad():
        s = torch.softmax(logits, -1)
        p = s[..., E]
        q = s.clone()
        q[..., E] = 0.0
        q /= (1 - p)[..., None]  # softmax over the non-E tokens
        logp = torch.log(s.gather(-1, labels[..., None]).squeeze(-1))
        g = -adv[:, None] * torch.exp(logp - old) * _token_weight(mask, aggregation)  # -A r / N
        e_e = F.one_hot(torch.full_like(labels, E), logits.shape[-1]).to(F64)
        e_y = F.one_hot(labels, logits.shape[-1]).to(F64)
        hier = e_e - (1 - lam) * q
        is_e = (labels == E)[..., None]
        expected = torch.where(is_e, g[..., None] * (1 - p)[..., None] * hier,
                               g[..., None] * ((e_y - q) - p[..., None] * hier))
    assert bool((is_e.squeeze(-1) & mask).any()) and bool((~is_e.squeeze(-1) & mask).any())
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


def test_lambda_zero_is_plain_grpo():
    # Wide log-ratios so that low clip, high clip and dual clip all occur.
    logits, labels, adv, mask, old = _problem(B=4, T=8, seed=1, log_ratio_scale=1.5)
    adv = torch.tensor([1.0, -1.0, 0.7, -2.0], dtype=F64)
    x = logits.clone().requires_grad_(True)
    loss, stats = ih_grpo_loss(x, labels, adv, mask, execute_token_id=E, lam=0.0, old_logprobs=old)
    x_ref = logits.clone().requires_grad_(True)
    ref = _ref_grpo_loss(x_ref, labels, adv, mask, old)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, x), _grad(ref, x_ref), rtol=1e-10, atol=1e-13)
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0 and stats["dual_clip_frac"] > 0


def test_lambda_one_is_explicit_two_level_policy():
    """EH-GRPO: execute with sigma(h), h = z_E - sg(log Z), else a token from q = softmax over non-E.

    Same distribution as the flat softmax, so the ratios and the loss value match plain GRPO; the
    gradient must equal IH-GRPO's at lambda = 1, clipped tokens included (both are zero there).
    """
    logits, labels, adv, mask, old = _problem(B=4, T=8, seed=2, log_ratio_scale=1.5)
    adv = torch.tensor([1.0, -1.0, 0.7, -2.0], dtype=F64)
    x = logits.clone().requires_grad_(True)
    loss, _ = ih_grpo_loss(x, labels, adv, mask, execute_token_id=E, lam=1.0, old_logprobs=old)

    x_ref = logits.clone().requires_grad_(True)
    not_e = torch.ones(logits.shape[-1], dtype=torch.bool)
    not_e[E] = False
    log_z = torch.logsumexp(x_ref[..., not_e], -1)  # independent of the library's log1mexp route
    h = x_ref[..., E] - log_z.detach()
    log_q_y = x_ref.gather(-1, labels[..., None]).squeeze(-1) - log_z
    logp2 = torch.where(labels == E, F.logsigmoid(h), F.logsigmoid(-h) + log_q_y)
    torch.testing.assert_close(logp2, torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1))
    a = adv[:, None]
    r = torch.exp(logp2 - old)
    l2 = torch.max(-a * r, -a * torch.clamp(r, 0.8, 1.28))
    l2 = torch.where(a < 0, torch.min(l2, -3.0 * a), l2)
    ref = (l2 * mask).sum() / mask.sum()
    torch.testing.assert_close(_grad(loss, x), _grad(ref, x_ref), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------


def test_aggregation_hand_values():
    # On-policy (r = 1) with token-level advantages and lam = 0: l_t = -A_t.
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # last row: a dropped sequence
    logits = torch.zeros(3, 3, 5, dtype=F64)
    labels = torch.zeros(3, 3, dtype=torch.long)

    def run(aggregation, **kw):
        loss, _ = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E, lam=0.0, aggregation=aggregation, **kw)
        return loss.item()

    assert run("token-mean") == pytest.approx(-(1 + 2 + 4) / 3)
    assert run("seq-mean-token-mean") == pytest.approx(-((1 + 2) / 2 + 4 / 1) / 2)  # empty row not counted
    assert run("seq-mean-token-sum-norm") == pytest.approx(-((1 + 2) / 3 + 4 / 3 + 0) / 3)  # C = T = 3, B = 3
    assert run("seq-mean-token-sum-norm", norm_constant=2) == pytest.approx(-((1 + 2) / 2 + 4 / 2 + 0) / 3)
    x = torch.tensor([[1.0, float("nan")]], dtype=F64)
    assert aggregate(x, torch.tensor([[1, 0]])).item() == 1.0  # masked NaN ignored
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, torch.tensor([[1, 0]]), "sum")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_surrogate_uses_policy_normaliser(aggregation):
    logits, labels, adv, mask, old = _problem(seed=3)
    lam = 0.3
    loss, st = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E, lam=lam, old_logprobs=old,
                            aggregation=aggregation)
    # Per-token surrogate c_t * l_t by hand, aggregated with the same normaliser.
    with torch.no_grad():
        lsm = torch.log_softmax(logits, -1)
        logp, logp_e = lsm.gather(-1, labels[..., None]).squeeze(-1), lsm[..., E]
        not_e = torch.ones(logits.shape[-1], dtype=torch.bool)
        not_e[E] = False
        log_z = torch.logsumexp(logits[..., not_e], -1)
        c = (1 - logp_e.exp() - (labels != E).to(F64)) * log_z
        r = torch.exp(logp - old)
        sur = (c * -adv[:, None] * r * _token_weight(mask, aggregation)).sum()
    assert st["surrogate"] == pytest.approx(sur.item(), rel=1e-10)
    assert loss.item() == pytest.approx(st["policy_loss"] + lam * st["surrogate"], rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Clipping
# ------------------------------------------------------------------------------------------------


def _one_token(adv: float, ratio: float, lam: float = 1e-3, label: int = 5, **kw):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 1, 9, generator=g, dtype=F64).requires_grad_(True)
    labels = torch.tensor([[label]])
    logp = torch.log_softmax(logits.detach(), -1)[0, 0, label]
    old = (logp - math.log(ratio)).reshape(1, 1)
    loss, st = ih_grpo_loss(logits, labels, torch.tensor([adv], dtype=F64), torch.ones(1, 1), execute_token_id=E,
                            lam=lam, old_logprobs=old, **kw)
    return loss, st, _grad(loss, logits)


@pytest.mark.parametrize(
    "adv, ratio, policy_loss, clipped_key",
    [
        (1.0, 1.5, -1.28, "clip_frac_high"),  # A > 0, r > 1 + 0.28
        (1.0, 4.0, -1.28, "clip_frac_high"),
        (-1.0, 0.5, 0.8, "clip_frac_low"),  # A < 0, r < 1 - 0.2
        (-2.0, 4.0, 6.0, "dual_clip_frac"),  # A < 0, r > 3: loss -A * 3
        (1.0, 0.5, -0.5, None),  # clip on the inactive side: gradient flows
        (-1.0, 2.0, 2.0, None),
        (-1.0, 1.1, 1.1, None),
    ],
)
@pytest.mark.parametrize("label", [E, 5])
def test_clip_and_dual_clip(adv, ratio, policy_loss, clipped_key, label):
    loss, st, grad = _one_token(adv, ratio, label=label)
    assert st["policy_loss"] == pytest.approx(policy_loss, rel=1e-12)
    assert st["ratio_mean"] == pytest.approx(ratio, rel=1e-12)
    for key in ("clip_frac_high", "clip_frac_low", "dual_clip_frac"):
        assert st[key] == (1.0 if key == clipped_key else 0.0)
    if clipped_key is None:
        assert grad.abs().max() > 1e-3
    else:
        assert torch.count_nonzero(grad) == 0  # surrogate gated too: exactly zero
        assert loss.item() == pytest.approx(policy_loss, rel=1e-12)


def test_surrogate_on_clipped_literal_form():
    """surrogate_on_clipped=True keeps SPEC's literal c_t * sg(l_t) on a clipped token: only the log Z part moves."""
    lam, adv, ratio, label = 0.5, 1.0, 1.5, 5
    loss, st, grad = _one_token(adv, ratio, lam=lam, label=label, surrogate_on_clipped=True)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 1, 9, generator=g, dtype=F64)[0, 0]
    s = torch.softmax(logits, -1)
    q = s.clone()
    q[E] = 0
    q /= 1 - s[E]
    expected = lam * ((1 - s[E]) - 1.0) * (-adv * 1.28) * q  # lam * c-coefficient * sg(l) * dlogZ/dz
    torch.testing.assert_close(grad[0, 0], expected, rtol=1e-9, atol=1e-12)
    assert st["clip_frac_high"] == 1.0


# ------------------------------------------------------------------------------------------------
# Masks and c_mask
# ------------------------------------------------------------------------------------------------


def test_masked_tokens_have_zero_grad_and_no_effect():
    logits, labels, adv, mask, old = _problem(seed=5, log_ratio_scale=0.5)
    adv_t = adv[:, None].expand(mask.shape).clone()
    ref_lp = old + 0.1
    kw = dict(execute_token_id=E, lam=0.5, kl_coef=0.1, entropy_coef=0.01)
    x = logits.clone().requires_grad_(True)
    loss, st = ih_grpo_loss(x, labels, adv_t, mask, old_logprobs=old, ref_logprobs=ref_lp, **kw)
    grad = _grad(loss, x)
    assert torch.count_nonzero(grad[~mask]) == 0

    # Garbage at masked positions: other logits, ignore-index labels, NaN/inf everywhere else.
    pad = ~mask
    logits2, labels2, adv2, old2, ref2 = logits.clone(), labels.clone(), adv_t.clone(), old.clone(), ref_lp.clone()
    logits2[pad] = 50 * torch.randn_like(logits2[pad])
    labels2[pad] = -100
    adv2[pad] = float("nan")
    old2[pad] = float("inf")
    ref2[pad] = float("nan")
    x2 = logits2.clone().requires_grad_(True)
    c_mask = torch.ones_like(mask)  # c_mask is ANDed with mask
    loss2, st2 = ih_grpo_loss(x2, labels2, adv2, mask, old_logprobs=old2, ref_logprobs=ref2, c_mask=c_mask, **kw)
    grad2 = _grad(loss2, x2)
    torch.testing.assert_close(loss2, loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=0)
    assert st2 == pytest.approx(st, rel=1e-12)


def test_c_mask_modes():
    logits, labels, adv, mask, old = _problem(B=2, T=6, seed=6)
    kw = dict(execute_token_id=E, old_logprobs=old)

    def loss_grad(**extra):
        x = logits.clone().requires_grad_(True)
        loss, _ = ih_grpo_loss(x, labels, adv, mask, **kw, **extra)
        return loss, _grad(loss, x)

    l_none, g_none = loss_grad(lam=0.5)
    l_all, g_all = loss_grad(lam=0.5, c_mask=mask.clone())
    torch.testing.assert_close((l_none, g_none), (l_all, g_all), rtol=0, atol=0)
    l_off, g_off = loss_grad(lam=0.5, c_mask=torch.zeros_like(mask))
    l_grpo, g_grpo = loss_grad(lam=0.0)
    torch.testing.assert_close((l_off, g_off), (l_grpo, g_grpo), rtol=1e-14, atol=0)

    cm = torch.zeros_like(mask)
    cm[0, 1] = cm[1, 3] = cm[0, 0] = True
    _, g_mix = loss_grad(lam=0.5, c_mask=cm)
    torch.testing.assert_close(g_mix[cm], g_none[cm], rtol=1e-12, atol=1e-15)  # IH form inside the cmask
    torch.testing.assert_close(g_mix[~cm], g_grpo[~cm], rtol=1e-12, atol=1e-15)  # plain GRPO outside


def test_decision_c_mask():
    fence, nl = 7, 8
    labels = torch.tensor([[1, fence, 3, 4, fence, E, 5], [fence, 9, 9, fence, 4, E, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0]])
    cm = decision_c_mask(labels, mask, E, fence_close_ids=[fence])
    expected = torch.tensor([[0, 0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    # row 1: the fence at t=0 is not trainable (prompt), so t=1 is no decision point.
    assert torch.equal(cm, expected)

    flags = torch.zeros_like(mask, dtype=torch.bool)
    flags[0, 4] = True  # only the second fence of row 0 is a closing one
    cm2 = decision_c_mask(labels, mask, E, fence_close_flags=flags)
    expected2 = torch.tensor([[0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(cm2, expected2)
    assert torch.equal(decision_c_mask(labels, mask, E, fence_close_ids=[nl]), labels.eq(E) & mask.bool())

    logits, _, adv, _, _ = _problem(B=2, T=7, V=11, seed=7)
    loss, st = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E, c_mask=cm)
    assert st["c_mask_frac"] == pytest.approx(4 / 12)


# ------------------------------------------------------------------------------------------------
# Token statistics and the chunked path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_token_stats_match_log_softmax(chunk):
    logits, labels, *_ = _problem(B=2, T=5, seed=8)
    logits[0, 1, 4] = float("-inf")  # a banned token must not break the entropy
    st = token_stats_from_logits(logits, labels, E, compute_entropy=True, chunk_size=chunk)
    lsm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(st.logp, lsm.gather(-1, labels[..., None]).squeeze(-1))
    torch.testing.assert_close(st.logp_exec, lsm[..., E])
    torch.testing.assert_close(st.z_exec, logits[..., E])
    ent = -(lsm.exp() * lsm.nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(st.entropy, ent)


def test_custom_backwards_pass_gradcheck():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, 6, generator=g, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda z: tuple(token_stats_from_logits(z, labels, E, compute_entropy=True, chunk_size=4)), (logits,))
    h = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: tuple(chunked_token_stats(h, w, labels, E, chunk_size=4, compute_entropy=True,
                                                  lm_head_bias=b, temperature=0.7)), (h, w, b))


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 14, 100])  # N = 14 tokens: 4 does not divide it
def test_chunked_path_matches_logits_path(chunk, entropy):
    B, T, H, V, temp = 2, 7, 6, 13, 0.7
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, 2] = E
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    labels[1, 6] = -100  # ignore-index at a masked slot
    adv = torch.tensor([0.8, -1.3], dtype=F64)
    old = -2.0 - torch.rand(B, T, generator=g, dtype=F64)
    ref = old - 0.1
    kw = dict(execute_token_id=E, lam=0.1, old_logprobs=old, kl_coef=0.05, ref_logprobs=ref,
              entropy_coef=0.02 if entropy else 0.0, aggregation="seq-mean-token-mean")

    p1 = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = (p1[0] @ p1[1].T + p1[2]) / temp
    loss1, st1 = ih_grpo_loss(logits, labels, adv, mask, **kw)
    g1 = torch.autograd.grad(loss1, p1)

    p2 = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    ts = chunked_token_stats(p2[0], p2[1], labels, E, chunk_size=chunk, compute_entropy=entropy,
                             lm_head_bias=p2[2], temperature=temp)
    loss2, st2 = ih_grpo_loss_from_stats(ts.logp, ts.logp_exec, ts.z_exec, labels, adv, mask, entropy=ts.entropy, **kw)
    g2 = torch.autograd.grad(loss2, p2)

    torch.testing.assert_close(loss2, loss1, rtol=1e-12, atol=1e-14)
    assert st2 == pytest.approx(st1, rel=1e-10, abs=1e-14)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_chunked_path_2d_hidden_and_no_weight_grad():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 4, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(10, 4, generator=g, dtype=F64)  # frozen head
    labels = torch.randint(0, 10, (9,), generator=g)
    ts = chunked_token_stats(hidden, weight, labels, E, chunk_size=2)
    ref = torch.log_softmax(hidden @ weight.T, -1)
    torch.testing.assert_close(ts.logp, ref.gather(-1, labels[:, None]).squeeze(-1))
    (gh,) = torch.autograd.grad(ts.logp.sum() + ts.z_exec.sum(), hidden)
    (gr,) = torch.autograd.grad(ref.gather(-1, labels[:, None]).sum() + (hidden @ weight.T)[:, E].sum(), hidden)
    torch.testing.assert_close(gh, gr)


def test_non_contiguous_logits():
    """logits[:, :-1] of a HF output is not viewable as [N, V]: walked per sequence, same result."""
    g = torch.Generator().manual_seed(12)
    full = torch.randn(3, 6, 9, generator=g, dtype=F64)
    labels = torch.randint(0, 9, (3, 5), generator=g)
    adv, mask = torch.randn(3, dtype=F64, generator=g), torch.ones(3, 5)
    x1 = full.clone().requires_grad_(True)
    l1, _ = ih_grpo_loss(x1[:, :-1], labels, adv, mask, execute_token_id=E, lam=0.5, chunk_size=2)
    x2 = full.clone().requires_grad_(True)
    l2, _ = ih_grpo_loss(x2[:, :-1].contiguous(), labels, adv, mask, execute_token_id=E, lam=0.5, chunk_size=2)
    torch.testing.assert_close(l1, l2, rtol=1e-14, atol=0)
    torch.testing.assert_close(_grad(l1, x1), _grad(l2, x2), rtol=1e-14, atol=0)


def test_kl_and_entropy_terms():
    logits, labels, adv, mask, old = _problem(seed=13)
    ref_lp = old - 0.3 * torch.rand_like(old)
    x = logits.clone().requires_grad_(True)
    loss, st = ih_grpo_loss(x, labels, adv, mask, execute_token_id=E, lam=0.0, old_logprobs=old, kl_coef=0.1,
                            ref_logprobs=ref_lp, entropy_coef=0.01)
    xr = logits.clone().requires_grad_(True)
    lsm = torch.log_softmax(xr, -1)
    logp = lsm.gather(-1, labels[..., None]).squeeze(-1)
    d = ref_lp - logp
    m = mask.to(F64)
    kl = ((d.exp() - d - 1) * m).sum() / m.sum()
    ent = (-(lsm.exp() * lsm).sum(-1) * m).sum() / m.sum()
    ref = _ref_grpo_loss(xr, labels, adv, mask, old) + 0.1 * kl - 0.01 * ent
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(loss, x), _grad(ref, xr), rtol=1e-10, atol=1e-13)
    assert st["kl_ref"] == pytest.approx(kl.item()) and st["entropy"] == pytest.approx(ent.item())


def test_stats_content():
    logits, labels, adv, mask, old = _problem(seed=14, log_ratio_scale=0.5)
    _, st = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E, old_logprobs=old)
    assert all(type(v) is float for v in st.values())
    for key in ("loss", "policy_loss", "surrogate", "clip_frac_low", "clip_frac_high", "clip_frac", "dual_clip_frac",
                "approx_kl", "ratio_mean", "ratio_max", "p_execute", "c_mask_frac", "n_tokens"):
        assert key in st
    m = mask
    p = torch.softmax(logits, -1)[..., E]
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    r = torch.exp(logp - old)
    assert st["p_execute"] == pytest.approx(p[m].mean().item())
    assert st["ratio_mean"] == pytest.approx(r[m].mean().item())
    assert st["ratio_max"] == pytest.approx(r[m].max().item())
    assert st["approx_kl"] == pytest.approx((r - 1 - torch.log(r))[m].mean().item())
    assert st["n_tokens"] == float(m.sum())
    assert st["clip_frac"] == pytest.approx(st["clip_frac_low"] + st["clip_frac_high"])
    _, st0 = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E)  # on-policy
    assert st0["ratio_mean"] == 1.0 and st0["approx_kl"] == 0.0 and st0["clip_frac"] == 0.0


# ------------------------------------------------------------------------------------------------
# Dtypes and input validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_float32_loss(low):
    logits, labels, adv, mask, old = _problem(B=2, T=16, V=64, seed=15, dtype=torch.float32)
    old = old.float()
    l32, st32 = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E, lam=0.5, old_logprobs=old)
    x = logits.to(low).requires_grad_(True)
    l_lo, st_lo = ih_grpo_loss(x, labels, adv, mask, execute_token_id=E, lam=0.5, old_logprobs=old)
    assert l32.dtype == torch.float32 and l_lo.dtype == torch.float32
    torch.testing.assert_close(l_lo, l32, rtol=0.05, atol=0.02)
    # Upcasting happens before any arithmetic: identical to feeding the upcast logits.
    l_up, _ = ih_grpo_loss(x.detach().float(), labels, adv, mask, execute_token_id=E, lam=0.5, old_logprobs=old)
    torch.testing.assert_close(l_lo, l_up, rtol=1e-6, atol=1e-7)
    g = _grad(l_lo, x)
    assert g.dtype == low and torch.isfinite(g.float()).all()


def test_float64_stays_float64():
    logits, labels, adv, mask, old = _problem(seed=16)
    st = token_stats_from_logits(logits, labels, E)
    assert st.logp.dtype == st.logp_exec.dtype == st.z_exec.dtype == F64
    loss, _ = ih_grpo_loss(logits, labels, adv.float(), mask, execute_token_id=E, old_logprobs=old)
    assert loss.dtype == F64
    h, w = torch.randn(4, 3, dtype=F64), torch.randn(7, 3, dtype=F64)
    assert chunked_token_stats(h, w, torch.zeros(4, dtype=torch.long), E).logp.dtype == F64


def test_bad_inputs_raise():
    logits, labels, adv, mask, old = _problem(B=2, T=3, V=5)
    kw = dict(execute_token_id=E)
    cases = [
        (lambda: ih_grpo_loss(logits[0], labels, adv, mask, **kw), "logits must be"),
        (lambda: ih_grpo_loss(logits, labels[:, :2], adv, mask, **kw), "labels must have shape"),
        (lambda: ih_grpo_loss(logits, labels, adv, mask[:1], **kw), "mask must have shape"),
        (lambda: ih_grpo_loss(logits, labels, torch.zeros(3), mask, **kw), "advantages must be"),
        (lambda: ih_grpo_loss(logits, labels, adv, mask, old_logprobs=old[:, :1], **kw), "old_logprobs"),
        (lambda: ih_grpo_loss(logits, labels, adv, mask, c_mask=mask[:, :1], **kw), "c_mask"),
        (lambda: ih_grpo_loss(logits, labels, adv, mask, aggregation="mean", **kw), "aggregation"),
        (lambda: ih_grpo_loss(logits, labels, adv, mask, kl_coef=0.1, **kw), "ref_logprobs"),
        (lambda: ih_grpo_loss(logits, labels, adv, mask, execute_token_id=5), "execute_token_id"),
        (lambda: ih_grpo_loss(logits, labels + 5, adv, mask, **kw), "outside"),
        (lambda: ih_grpo_loss(logits, labels.float(), adv, mask, **kw), "integer"),
        (lambda: ih_grpo_loss(logits, labels, adv, mask, dual_clip=0.5, **kw), "dual_clip"),
        (lambda: chunked_token_stats(torch.randn(2, 3, 4), torch.randn(5, 3), labels, E), "lm_head_weight"),
        (lambda: chunked_token_stats(torch.randn(2, 3, 4), torch.randn(5, 4), labels[:, :1], E), "hidden must be"),
        (lambda: chunked_token_stats(torch.randn(2, 3, 4), torch.randn(5, 4, dtype=F64), labels, E), "dtype"),
        (lambda: chunked_token_stats(torch.randn(2, 3, 4), torch.randn(5, 4), labels, E, chunk_size=0), "chunk"),
        (lambda: decision_c_mask(labels, mask[:1], E), "labels and mask"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_z_stable_when_p_execute_near_zero_or_one(dtype):
    """log Z = z_E - log p + log(1 - p): accurate to the precision of the logsumexp, finite when p rounds to 1."""
    V = 10
    z = torch.zeros(1, 4, V, dtype=dtype)
    z[0, 0, E] = 8.0 if dtype == torch.float32 else 20.0  # 1 - p ~ 3e-3 (fp32) / 2e-8 (fp64)
    z[0, 1, E] = 1e3  # p == 1 in floating point
    z[0, 2, E] = -30.0  # p ~ 1e-13
    z[0, 3, E] = 0.5
    labels = torch.tensor([[5, 5, E, 5]])
    st = token_stats_from_logits(z, labels, E)
    from ihgrpo.losses import _log1mexp

    log_z = st.z_exec - st.logp_exec + _log1mexp(st.logp_exec)
    exact = math.log(V - 1)  # the non-E logits are all 0
    # Error budget: the absolute error of the logsumexp (~ eps * |lse|) divided by 1 - p.
    tol = 1e-3 if dtype == torch.float32 else 1e-6
    assert log_z[0, 0].item() == pytest.approx(exact, abs=tol)
    assert log_z[0, 2].item() == pytest.approx(exact, abs=1e-5 if dtype == torch.float32 else 1e-12)
    assert log_z[0, 3].item() == pytest.approx(exact, abs=1e-6 if dtype == torch.float32 else 1e-14)
    assert torch.isfinite(log_z).all()
    x = z.clone().requires_grad_(True)
    loss, _ = ih_grpo_loss(x, labels, torch.tensor([1.0]), torch.ones(1, 4), execute_token_id=E, lam=0.5)
    assert torch.isfinite(loss) and torch.isfinite(_grad(loss, x)).all()


# ------------------------------------------------------------------------------------------------
# Mixed precision: under autocast the chunked head must compute one function in forward and backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_under_autocast_matches_autograd_through_the_same_logits(temperature):
    """fp32 weights under bf16 autocast (model.dtype auto on a GPU; CPU autocast dispatches the same
    way). Forward builds bf16 logits; a backward that recomputed them in fp32 would take the softmax
    against a bf16 log-sum-exp and be ~5% off on confident tokens. The reference is plain autograd
    through the very same bf16 logits; both are also compared with the exact (fp64) gradient."""
    g = torch.Generator().manual_seed(21)
    N, H, V = 64, 32, 512
    hidden = torch.randn(N, H, generator=g)
    weight = 0.5 * torch.randn(V, H, generator=g)
    bias = 0.1 * torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    weight[labels] += 6.0 * hidden / hidden.norm(dim=1, keepdim=True)  # confident tokens: p(label) ~ 1
    labels[::5] = E
    coef = [torch.randn(N, generator=g) for _ in range(3)]

    def objective(ts):
        return (ts.logp * coef[0]).sum() + (ts.logp_exec * coef[1]).sum() + (ts.z_exec * coef[2]).sum()

    def grads(stats_fn, dtype=torch.float32, autocast=True):
        p = [t.to(dtype).requires_grad_(True) for t in (hidden, weight, bias)]
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            ts = stats_fn(*p)
        assert ts.logp.dtype == (F64 if dtype == F64 else torch.float32)
        return [x.double() for x in torch.autograd.grad(objective(ts), p)]

    chunked = grads(lambda h, w, b: chunked_token_stats(h, w, labels, E, chunk_size=16, lm_head_bias=b,
                                                        temperature=temperature))
    through_logits = grads(lambda h, w, b: token_stats_from_logits(F.linear(h, w, b) / temperature, labels, E))
    exact = grads(lambda h, w, b: token_stats_from_logits(F.linear(h, w, b) / temperature, labels, E),
                  dtype=F64, autocast=False)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for c, t, x in zip(chunked, through_logits, exact):
        assert rel(c, t) < 0.01  # the same function; bf16 rounding of the gradient matmuls aside
        assert rel(c, x) < 2 * rel(t, x) + 1e-3  # no worse than autograd through bf16 logits


def test_chunked_head_without_autocast_is_unchanged_by_the_autocast_path():
    """Outside autocast the matmuls stay in the weights' dtype (fp32 here): exactly today's result."""
    g = torch.Generator().manual_seed(22)
    hidden, weight = torch.randn(10, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (10,), generator=g)
    ts = chunked_token_stats(hidden, weight, labels, E, chunk_size=3)
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(ts.logp, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="share a dtype"):
        chunked_token_stats(hidden, weight.double(), labels, E)
