"""Truncated importance sampling (TIS) against the rollout engine's log-probs, and the mismatch
metrics (mean |delta logp|, max/min ratio) the loss reports whenever it gets those log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from ihgrpo.losses import ih_grpo_loss, ih_grpo_loss_from_stats, token_stats_from_logits

F64 = torch.float64
E = 2


def _toy(seed=0, B=3, T=6, V=9):
    g = torch.Generator().manual_seed(seed)
    logits = (1.5 * torch.randn(B, T, V, generator=g)).to(F64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, 0] = E
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = mask[2, 0] = False
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    old = logp + 0.05 * torch.randn(B, T, generator=g, dtype=F64)
    # The rollout engine's log-probs: close to old on most tokens, far below it on a few (ratio > cap).
    rollout = old + 0.1 * torch.randn(B, T, generator=g, dtype=F64)
    rollout[0, 1] = old[0, 1] - math.log(5.0)  # ratio old/rollout = 5
    rollout[1, 3] = old[1, 3] - math.log(3.0)  # 3
    rollout[2, 0] = old[2, 0] - 30.0  # masked: must not count anywhere
    return logits, labels, adv, mask, old, rollout


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("lam", [0.0, 1e-3, 1.0])
def test_none_leaves_the_loss_unchanged(lam):
    logits, labels, adv, mask, old, rollout = _toy()
    x0 = logits.clone().requires_grad_(True)
    x1 = logits.clone().requires_grad_(True)
    base, st0 = ih_grpo_loss(x0, labels, adv, mask, execute_token_id=E, lam=lam, old_logprobs=old)
    same, st1 = ih_grpo_loss(x1, labels, adv, mask, execute_token_id=E, lam=lam, old_logprobs=old,
                             rollout_logprobs=rollout, rollout_is="none")
    assert torch.equal(base, same)
    assert torch.equal(_grad(base, x0), _grad(same, x1))
    assert {k: v for k, v in st1.items() if not k.startswith("rollout_")} == st0
    assert "rollout_is_weight_mean" not in st1  # no weights without TIS


def test_one_token_by_hand():
    """A = 1, on policy, rollout log-prob log(5) below: the weight is min(5, C)."""
    logits = torch.tensor([[[0.3, -0.2, 1.1, 0.0]]], dtype=F64)
    labels = torch.tensor([[1]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    logp = torch.log_softmax(logits, -1)[0, 0, 1]
    rollout = (logp - math.log(5.0)).reshape(1, 1)
    for cap, want in ((2.0, -2.0), (10.0, -5.0)):
        loss, st = ih_grpo_loss(logits, labels, torch.tensor([1.0], dtype=F64), mask, execute_token_id=E,
                                lam=0.0, rollout_logprobs=rollout, rollout_is="tis", rollout_is_cap=cap)
        assert loss.item() == pytest.approx(want)
        assert st["rollout_is_capped_frac"] == (1.0 if cap == 2.0 else 0.0)


@pytest.mark.parametrize("lam", [0.0, 1e-3, 1.0])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_tis_weights_the_per_token_loss(lam, aggregation):
    """TIS multiplies each token's loss by w = min(exp(old - rollout), C), a stop-gradient constant.
    Since w > 0 that is the loss with per-token advantages A * w: clip masks, the dual clip and the
    surrogate's sg(l_t) all scale with it (so the SPEC gradient identity holds with g = -A r w / N)."""
    logits, labels, adv, mask, old, rollout = _toy(seed=3)
    cap = 2.0
    w = torch.exp(old - rollout).clamp(max=cap)
    assert w[0, 1] == cap and w[1, 3] == cap and (w[mask] < cap).sum() >= 10  # the cap binds on some only
    x = logits.clone().requires_grad_(True)
    loss, st = ih_grpo_loss(x, labels, adv, mask, execute_token_id=E, lam=lam, old_logprobs=old,
                            aggregation=aggregation, rollout_logprobs=rollout, rollout_is="tis",
                            rollout_is_cap=cap)
    xr = logits.clone().requires_grad_(True)
    ref, _ = ih_grpo_loss(xr, labels, adv[:, None] * w, mask, execute_token_id=E, lam=lam, old_logprobs=old,
                          aggregation=aggregation)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(loss, x), _grad(ref, xr), rtol=1e-10, atol=1e-13)
    assert st["rollout_is_weight_mean"] == pytest.approx(w[mask].mean().item())
    assert st["rollout_is_capped_frac"] == pytest.approx(2 / mask.sum().item())


def test_on_policy_tis_uses_the_trainer_log_probs_as_old():
    """old_logprobs None (one update per step): old = sg(logp), so w = min(exp(logp - rollout), C)."""
    logits, labels, adv, mask, _, rollout = _toy(seed=5)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    w = torch.exp(logp - rollout).clamp(max=2.0)
    loss, _ = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E, rollout_logprobs=rollout,
                           rollout_is="tis")
    ref, _ = ih_grpo_loss(logits, labels, adv[:, None] * w, mask, execute_token_id=E)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)


def test_mismatch_metrics():
    logits, labels, adv, mask, old, rollout = _toy(seed=7)
    _, st = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E, old_logprobs=old, rollout_logprobs=rollout)
    d = (old - rollout)[mask]
    assert st["rollout_logp_absdiff"] == pytest.approx(d.abs().mean().item())
    assert st["rollout_ratio_max"] == pytest.approx(d.exp().max().item())  # 5: the masked 1e13 is ignored
    assert st["rollout_ratio_max"] == pytest.approx(5.0, rel=0.1)
    assert st["rollout_ratio_min"] == pytest.approx(d.exp().min().item())
    # identical log-probs: no mismatch
    _, st0 = ih_grpo_loss(logits, labels, adv, mask, execute_token_id=E, old_logprobs=old, rollout_logprobs=old)
    assert st0["rollout_logp_absdiff"] == 0.0 and st0["rollout_ratio_max"] == st0["rollout_ratio_min"] == 1.0


def test_bad_settings_are_clear_errors():
    logits, labels, adv, mask, old, rollout = _toy()
    st = token_stats_from_logits(logits, labels, E)
    args = (st.logp, st.logp_exec, st.z_exec, labels, adv, mask)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        ih_grpo_loss_from_stats(*args, execute_token_id=E, rollout_is="tis")
    with pytest.raises(ValueError, match="rollout_is must be"):
        ih_grpo_loss_from_stats(*args, execute_token_id=E, rollout_logprobs=rollout, rollout_is="icepop")
    with pytest.raises(ValueError, match="rollout_is_cap"):
        ih_grpo_loss_from_stats(*args, execute_token_id=E, rollout_logprobs=rollout, rollout_is="tis",
                                rollout_is_cap=0.0)
    with pytest.raises(ValueError, match="rollout_logprobs must have shape"):
        ih_grpo_loss_from_stats(*args, execute_token_id=E, rollout_logprobs=rollout[:, :2])
