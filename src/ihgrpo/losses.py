"""IH-GRPO loss (SPEC section 4; arXiv 2605.18500).

Per response token t, with ratio r_t = exp(logp_t - logp_old_t) and advantage A:

    l_t   = dual_clip( max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high)) )
    c_t   = ( sg(1 - p_t) - 1[y_t != E] ) * log Z_t
    L     = mean_m( l_t ) + lambda * mean_m( c_t * sg(l_t) * cmask_t )

p_t = softmax(z_t)[E] is the probability of the execute token E, and log Z_t is the logsumexp over
the non-E logits, log Z = z_E - log p + log(1 - p). For an unclipped token, with q = softmax over
the non-E tokens and g = -A r / N, the gradient w.r.t. the logits z_t is

    y = E  :  g * (1 - p) * (e_E - (1 - lambda) q)
    y != E :  g * ((e_y - q) - p * (e_E - (1 - lambda) q))

lambda = 0 is plain GRPO, lambda = 1 the explicit two-level policy (EH-GRPO).

Rollout-vs-trainer mismatch: the tokens were sampled by the rollout engine (vLLM, or the HF
generator), whose log-probs differ from the trainer's (kernels, precision). Given the engine's
log-probs, truncated importance sampling (TIS, `rollout_is="tis"`) multiplies each token's loss by
w_t = min(exp(logp_old_t - logp_rollout_t), C), a constant (no gradient). Since w_t > 0 this is the
loss with per-token advantage A * w_t: the clip decisions do not change, the surrogate's sg(l_t)
scales with it, and the gradient identity above holds with g = -A r w / N.

Everything here is plain torch on per-token tensors, so any trainer can use it:

    token_stats_from_logits(logits, labels, E)         -> TokenStats(logp, logp_exec, z_exec, entropy)
    chunked_token_stats(hidden, lm_head_weight, labels, E)  same, never holding [B, T, V] logits
    ih_grpo_loss_from_stats(logp, logp_exec, z_exec, ...)   the loss above (the only copy of the math)
    ih_grpo_loss(logits, labels, advantages, mask, ...)     = token_stats_from_logits + the above
    decision_c_mask(labels, mask, E, ...)                   cmask for the "decision" mode
    aggregate(x, mask, mode)                                token-mean / seq-mean-token-mean / ...

Conventions:
- Alignment: logits[b, t] are the logits that produced labels[b, t], the token sampled at t. With a
  HF causal LM the caller shifts: logits = out.logits[:, :-1], labels = ids[:, 1:], mask = mask[:, 1:].
- Temperature: logits given to ih_grpo_loss / token_stats_from_logits must already be divided by the
  sampling temperature; chunked_token_stats takes `temperature` and divides itself.
- mask: nonzero = trainable (a token the policy sampled). Masked positions may hold anything
  (labels -100, NaN advantages, garbage old log-probs): they get exactly zero gradient and do not
  change the loss.
- Precision: float64 inputs are computed in float64, every other float dtype in float32.

Choices the SPEC leaves open (all in ih_grpo_loss_from_stats):
- mean_m of the surrogate uses the policy term's normaliser (mask tokens, not cmask tokens), so the
  gradient identity above holds with the same N for every aggregation.
- Clipped tokens: sg(l_t) in the surrogate is taken as 0 where clip / dual-clip is active, so a
  clipped token gets exactly zero gradient, as under the explicit two-level policy. The literal
  c_t * sg(l_t) on clipped tokens too is `surrogate_on_clipped=True`. Unclipped tokens: identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ROLLOUT_IS = ("none", "tis")  # importance sampling against the rollout engine's log-probs
DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: one [chunk, V] fp32 buffer = 0.6 GB at V = 151,936
LOG_RATIO_CLAMP = 20.0  # keeps exp() finite; past it a token is clipped or its gradient -A r is ~0


class TokenStats(NamedTuple):
    """Per-token quantities the loss needs, each [B, T] (or [N]) in the compute dtype."""

    logp: Tensor  # log p(y_t)
    logp_exec: Tensor  # log p(E)
    z_exec: Tensor  # z_E, the (temperature-scaled) logit of E
    entropy: Tensor | None  # H(softmax(z_t)), only when asked for


# ---------------------------------------------------------------------------------------------
# Per-token statistics: one pass over the vocabulary per chunk of tokens.
# Both entry points (from logits, from hidden states) share the two chunk kernels below, and both
# use a hand-written backward so that a chunk costs one [chunk, V] buffer in forward and backward.
# ---------------------------------------------------------------------------------------------


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _stats_chunk(
    z: Tensor, y: Tensor, exec_id: int, want_entropy: bool, inplace: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """lse, log p(y), log p(E), z_E and entropy for one [C, V] chunk of logits (compute dtype).

    `inplace=True` lets the kernel use z as its scratch buffer (the caller owns z).
    """
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_e = z[:, exec_id].clone()
    m = z.amax(dim=1, keepdim=True)
    shifted = z.sub_(m) if inplace else z - m  # z - max <= 0, so exp never overflows
    if want_entropy:
        e = shifted.exp()
        s = e.sum(1)
        # H = lse - sum_v softmax_v z_v = log s - sum_v e_v (z_v - m) / s; a -inf logit gives 0 * -inf.
        ent = s.log() - shifted.mul_(e).nan_to_num_(nan=0.0).sum(1) / s
    else:
        s = shifted.exp_().sum(1)
        ent = None
    lse = m.squeeze(1) + s.log()
    return lse, z_y - lse, z_e - lse, z_e, ent


def _grad_chunk(
    z: Tensor,
    lse: Tensor,
    ent: Tensor | None,
    y: Tensor,
    exec_id: int,
    g_logp: Tensor,
    g_logp_e: Tensor,
    g_z_e: Tensor,
    g_ent: Tensor | None,
    out: Tensor | None = None,
) -> Tensor:
    """d/dz of sum_t (g_logp logp + g_logp_e logp_E + g_z_e z_E + g_ent H) for one chunk.

    d logp/dz = e_y - s,  d logp_E/dz = e_E - s,  d z_E/dz = e_E,  dH/dz = -s (log s + H),
    with s = softmax(z). `out` may be z itself (in place) or a slice of the final gradient.
    """
    log_s = z.sub_(lse[:, None]) if out is z else torch.sub(z, lse[:, None], out=out)
    if g_ent is None:
        grad = log_s.exp_().mul_(-(g_logp + g_logp_e)[:, None])
    else:
        s = log_s.exp()
        coef = log_s.add_(ent[:, None]).mul_(-g_ent[:, None]).sub_((g_logp + g_logp_e)[:, None])
        grad = coef.mul_(s).nan_to_num_(nan=0.0)  # -inf logits: s = 0 times an infinite coefficient
    grad.scatter_add_(1, y[:, None], g_logp[:, None])
    grad[:, exec_id] += g_logp_e + g_z_e
    return grad


def _row_blocks(x: Tensor, chunk_size: int) -> Iterator[tuple[int, int, Tensor]]:
    """Yield (start, end, block) over the flattened leading dims of x [..., V], block = rows [start, end).

    Blocks are views: a non-contiguous x (e.g. logits[:, :-1]) is walked one sequence at a time
    instead of being copied by reshape.
    """
    v = x.shape[-1]
    try:
        flat = x.view(-1, v)
    except RuntimeError:
        flat = None
    if flat is not None:
        for s in range(0, flat.shape[0], chunk_size):
            yield s, min(s + chunk_size, flat.shape[0]), flat[s : s + chunk_size]
        return
    rows = x.reshape(-1, *x.shape[-2:])  # [B', T, V]: only leading dims merged, still a view here
    t = rows.shape[1]
    for b in range(rows.shape[0]):
        for s in range(0, t, chunk_size):
            e = min(s + chunk_size, t)
            yield b * t + s, b * t + e, rows[b, s:e]


class _LogitsTokenStats(torch.autograd.Function):
    """TokenStats from logits [..., V]; backward writes d/dlogits chunk by chunk into one buffer."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, exec_id: int, want_entropy: bool, chunk_size: int):
        cdtype = _compute_dtype(logits.dtype)
        n = labels.numel()
        lse, logp, logp_e, z_e, ent = (logits.new_empty(n, dtype=cdtype) for _ in range(5))
        flat_labels = labels.reshape(-1)
        for s, e, block in _row_blocks(logits, chunk_size):
            own = block.dtype != cdtype
            z = block.to(cdtype) if own else block  # bf16/fp16: one fp32 copy per chunk only
            out = _stats_chunk(z, flat_labels[s:e], exec_id, want_entropy, inplace=own)
            for dst, src in zip((lse, logp, logp_e, z_e, ent), out):
                if src is not None:
                    dst[s:e] = src
        if not want_entropy:
            ent = logits.new_zeros(0, dtype=cdtype)
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(logits, flat_labels, lse, ent)
        ctx.exec_id, ctx.want_entropy, ctx.chunk_size = exec_id, want_entropy, chunk_size
        return logp, logp_e, z_e, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp: Tensor, g_logp_e: Tensor, g_z_e: Tensor, g_ent: Tensor):
        logits, labels, lse, ent = ctx.saved_tensors
        cdtype = lse.dtype
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_flat = grad.view(-1, logits.shape[-1])
        for s, e, block in _row_blocks(logits, ctx.chunk_size):
            args = (lse[s:e], ent[s:e] if ctx.want_entropy else None, labels[s:e], ctx.exec_id,
                    g_logp[s:e], g_logp_e[s:e], g_z_e[s:e], g_ent[s:e] if ctx.want_entropy else None)
            if block.dtype == cdtype:
                _grad_chunk(block, *args, out=grad_flat[s:e])  # written straight into the result
            else:
                z = block.to(cdtype)
                grad_flat[s:e] = _grad_chunk(z, *args, out=z)
        return grad, None, None, None, None


def _head_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, cdtype: torch.dtype) -> Tensor:
    """Fresh [C, V] logits in the compute dtype: (h W^T + b) / temperature, the matmul in h's dtype."""
    z = torch.nn.functional.linear(h, weight, bias)
    if z.dtype != cdtype:
        z = z.to(cdtype)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _as(x: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return x if x is None or dtype is None or x.dtype == dtype else x.to(dtype)


class _ChunkedLMHeadStats(torch.autograd.Function):
    """TokenStats from hidden [N, H] and the output layer; logits exist one chunk at a time.

    Backward recomputes each chunk's logits (one extra matmul) instead of keeping them. The matmuls
    run in `mm_dtype` (the caller's autocast dtype; None: the inputs' dtype) in forward *and*
    backward: backward runs outside autocast, and fp32 logits there against the bf16 forward's
    log-sum-exp would be a wrong softmax (gradients off by 5-15% on confident tokens).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, exec_id: int,
                temperature: float, want_entropy: bool, chunk_size: int, mm_dtype: torch.dtype | None):
        cdtype = _compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        lse, logp, logp_e, z_e, ent = (hidden.new_empty(n, dtype=cdtype) for _ in range(5))
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit (mm_dtype)
            w, b = _as(weight, mm_dtype), _as(bias, mm_dtype)  # one cast of the head, not one per chunk
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                z = _head_logits(_as(hidden[s:e], mm_dtype), w, b, temperature, cdtype)
                out = _stats_chunk(z, labels[s:e], exec_id, want_entropy, inplace=True)
                for dst, src in zip((lse, logp, logp_e, z_e, ent), out):
                    if src is not None:
                        dst[s:e] = src
                del z, out
        if not want_entropy:
            ent = hidden.new_zeros(0, dtype=cdtype)
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.exec_id, ctx.temperature, ctx.mm_dtype = exec_id, temperature, mm_dtype
        ctx.want_entropy, ctx.chunk_size = want_entropy, chunk_size
        return logp, logp_e, z_e, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp: Tensor, g_logp_e: Tensor, g_z_e: Tensor, g_ent: Tensor):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdtype, mm_dtype = lse.dtype, ctx.mm_dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulated in the weight's dtype (addmm_: no [V, H] temporary per chunk, unless mm_dtype differs).
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=cdtype, device=weight.device) if need_b else None
        n = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _as(weight, mm_dtype), _as(bias, mm_dtype)
            for s in range(0, n, ctx.chunk_size):
                e = min(s + ctx.chunk_size, n)
                h = _as(hidden[s:e], mm_dtype)
                z = _head_logits(h, w, b, ctx.temperature, cdtype)
                gz = _grad_chunk(z, lse[s:e], ent[s:e] if ctx.want_entropy else None, labels[s:e], ctx.exec_id,
                                 g_logp[s:e], g_logp_e[s:e], g_z_e[s:e], g_ent[s:e] if ctx.want_entropy else None,
                                 out=z)
                if ctx.temperature != 1.0:
                    gz.div_(ctx.temperature)
                if need_b:
                    grad_b += gz.sum(0)
                gz = gz.to(w.dtype)
                if need_h:
                    grad_h[s:e] = gz @ w
                if need_w:
                    grad_w.addmm_(gz.t(), h) if w is weight else grad_w.add_(gz.t() @ h)
                del z, gz
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _check_labels(labels: Tensor, vocab: int, exec_id: int) -> Tensor:
    """Validate ids; map negative labels (ignore-index, e.g. -100) to 0. Their outputs are meaningless."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not 0 <= exec_id < vocab:
        raise ValueError(f"execute_token_id={exec_id} is outside the vocabulary [0, {vocab})")
    if labels.numel() and int(labels.max()) >= vocab:
        raise ValueError(f"labels contain id {int(labels.max())} >= vocabulary size {vocab}")
    return labels.clamp(min=0)


def _check_chunk(chunk_size: int) -> None:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def token_stats_from_logits(
    logits: Tensor,
    labels: Tensor,
    execute_token_id: int,
    *,
    compute_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenStats:
    """log p(y), log p(E), z_E (and entropy) from logits [..., V] aligned with labels [...].

    One logsumexp pass per chunk of `chunk_size` tokens; differentiable w.r.t. logits (custom
    backward, one [chunk, V] fp32 buffer for low-precision logits, none extra for fp32/fp64).
    Negative labels are treated as ignored positions (their outputs are meaningless; mask them).
    """
    if logits.dim() < 2 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"logits must be [..., V] with labels [...]; got logits {tuple(logits.shape)}, "
                         f"labels {tuple(labels.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    _check_chunk(chunk_size)
    y = _check_labels(labels, logits.shape[-1], execute_token_id)
    logp, logp_e, z_e, ent = _LogitsTokenStats.apply(logits, y, int(execute_token_id), bool(compute_entropy),
                                                     int(chunk_size))
    shape = labels.shape
    return TokenStats(logp.view(shape), logp_e.view(shape), z_e.view(shape),
                      ent.view(shape) if compute_entropy else None)


def chunked_token_stats(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    execute_token_id: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compute_entropy: bool = False,
    lm_head_bias: Tensor | None = None,
    temperature: float = 1.0,
) -> TokenStats:
    """TokenStats from hidden states [B, T, H] (or [N, H]) and the output layer [V, H] (+ bias [V]).

    Logits = (hidden @ W^T + b) / temperature are built `chunk_size` tokens at a time (the matmul in
    the weights' dtype, or the autocast dtype under autocast; after it fp32, or fp64 for fp64 inputs);
    backward recomputes them per chunk with the same matmul, so no [B, T, V] tensor ever exists.
    Gradients flow to hidden, weight and bias (accumulated in the weight's dtype). Outputs: labels' shape.
    """
    if hidden.dim() < 2 or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"hidden must be [..., H] with labels [...]; got hidden {tuple(hidden.shape)}, "
                         f"labels {tuple(labels.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [V, {hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}")
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (lm_head_weight.shape[0],):
        raise ValueError(f"lm_head_bias must be [{lm_head_weight.shape[0]}], got {tuple(lm_head_bias.shape)}")
    autocast = hidden.dtype != torch.float64 and torch.is_autocast_enabled(hidden.device.type)
    mm_dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else None  # as nn.Linear's matmul
    if mm_dtype is None and (hidden.dtype != lm_head_weight.dtype
                             or (lm_head_bias is not None and lm_head_bias.dtype != hidden.dtype)):
        raise ValueError(f"hidden ({hidden.dtype}) and the output layer ({lm_head_weight.dtype}) must share a dtype")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_chunk(chunk_size)
    y = _check_labels(labels, lm_head_weight.shape[0], execute_token_id).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])
    logp, logp_e, z_e, ent = _ChunkedLMHeadStats.apply(h, lm_head_weight, lm_head_bias, y, int(execute_token_id),
                                                       float(temperature), bool(compute_entropy), int(chunk_size),
                                                       mm_dtype)
    shape = labels.shape
    return TokenStats(logp.view(shape), logp_e.view(shape), z_e.view(shape),
                      ent.view(shape) if compute_entropy else None)


# ---------------------------------------------------------------------------------------------
# Masks and aggregation
# ---------------------------------------------------------------------------------------------


def decision_c_mask(
    labels: Tensor,
    mask: Tensor,
    execute_token_id: int,
    *,
    fence_close_ids: Iterable[int] = (),
    fence_close_flags: Tensor | None = None,
) -> Tensor:
    """Boolean [B, T] cmask for the "decision" mode: E tokens and the positions right after a closing fence.

    Position t right after a closing fence is where the policy chooses between E (execute now) and
    going on. A position t-1 closes a fence if labels[t-1] is in `fence_close_ids` or
    fence_close_flags[t-1] is true (flags computed by the caller, e.g. from decoded text offsets;
    use them when the fence token id also occurs in opening fences). Only trainable fence tokens
    count, and the result is ANDed with mask.
    """
    if labels.dim() != 2 or tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(f"labels and mask must both be [B, T]; got {tuple(labels.shape)} and {tuple(mask.shape)}")
    m = mask.bool()
    ids = torch.as_tensor(list(fence_close_ids), dtype=labels.dtype, device=labels.device)
    closes = torch.isin(labels, ids)
    if fence_close_flags is not None:
        if tuple(fence_close_flags.shape) != tuple(labels.shape):
            raise ValueError(f"fence_close_flags must be {tuple(labels.shape)}, got {tuple(fence_close_flags.shape)}")
        closes = closes | fence_close_flags.bool()
    closes = closes & m
    after_close = torch.zeros_like(m)
    after_close[:, 1:] = closes[:, :-1]
    return (after_close | (labels == execute_token_id)) & m


def aggregate(x: Tensor, mask: Tensor, mode: str = "token-mean", norm_constant: float | None = None) -> Tensor:
    """Reduce per-token x [B, T] over the trainable tokens (mask [B, T], nonzero = trainable).

    token-mean               sum of all tokens / number of tokens (DAPO).
    seq-mean-token-mean      per-sequence token mean, then mean over the sequences that have at least
                             one token (GRPO; fully masked rows, e.g. dropped void trajectories, do not
                             dilute the mean).
    seq-mean-token-sum-norm  per-sequence token sum / norm_constant, then mean over all B rows
                             (Dr.GRPO: a constant normaliser). norm_constant defaults to T = mask.shape[-1],
                             the padded response length; pass the configured max response length to
                             make it independent of the batch.
    """
    m = mask.bool()
    x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))  # also drops NaN/inf at masked slots
    if mode == "token-mean":
        return x.sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        counts = m.sum(-1)
        seq = x.sum(-1) / counts.clamp(min=1)
        return seq.sum() / (counts > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        c = float(mask.shape[-1] if norm_constant is None else norm_constant)
        if not c > 0:
            raise ValueError(f"norm_constant must be > 0, got {norm_constant}")
        return x.sum() / (c * x.shape[0])
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0 without cancellation (Maechler 2012).

    log(-expm1(x)) near 0 (p close to 1), log1p(-exp(x)) for x < -log 2. x is clamped to <= -eps so
    that p == 1 in floating point gives a finite log Z (and no NaN gradient) instead of -inf; the
    clamp also stops the log Z gradient for such tokens, whose q is not resolvable in this precision.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def _check_bt(name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape [B, T] = {list(shape)}, got {list(t.shape)}")


def ih_grpo_loss_from_stats(
    logp: Tensor,
    logp_exec: Tensor,
    z_exec: Tensor,
    labels: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    execute_token_id: int,
    lam: float = 1e-3,
    old_logprobs: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    aggregation: str = "token-mean",
    c_mask: Tensor | None = None,
    kl_coef: float = 0.0,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    norm_constant: float | None = None,
    surrogate_on_clipped: bool = False,
    rollout_logprobs: Tensor | None = None,
    rollout_is: str = "none",
    rollout_is_cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """IH-GRPO loss from per-token log p(y), log p(E), z_E (all [B, T], differentiable).

    L = agg(l_t) + lam * agg(c_t * sg(l_t) * cmask_t) + kl_coef * agg(k3 KL to ref) - entropy_coef * agg(H)

    - advantages [B] (one per sequence) or [B, T]; old_logprobs None = on-policy (old = sg(logp),
      ratio 1 with the gradient of logp).
    - The surrogate uses the same aggregation normaliser as the policy term (denominators count the
      `mask` tokens, not the cmask tokens), which is what makes the gradient identity hold with
      g = -A r / N.
    - c_mask None = every trainable token (the release); pass decision_c_mask(...) for "decision".
    - surrogate_on_clipped=False (default): sg(l_t) is replaced by 0 on tokens where clipping or
      dual-clip is active, so clipped tokens get exactly zero gradient, as they would under the
      explicit two-level policy the surrogate emulates. True: SPEC's literal c_t * sg(l_t) there too.
    - dual_clip None disables dual-clip.
    - rollout_logprobs [B, T]: the rollout engine's log-probs of the sampled tokens. Given, the stats
      report the mismatch with old (rollout_logp_absdiff = mean |old - rollout|, rollout_ratio_max /
      _min of exp(old - rollout)); with rollout_is="tis" each token's loss is multiplied by
      min(exp(old - rollout), rollout_is_cap) (see the module docstring). "none" leaves the loss as is.
    Returns (loss, stats) with stats a dict of python floats; ratio/clip/KL/p_execute stats are token
    means over the mask whatever the aggregation.
    """
    shape = tuple(logp.shape)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got {list(logp.shape)}")
    for name, t in (("logp_exec", logp_exec), ("z_exec", z_exec), ("labels", labels), ("mask", mask),
                    ("old_logprobs", old_logprobs), ("c_mask", c_mask), ("ref_logprobs", ref_logprobs),
                    ("entropy", entropy), ("rollout_logprobs", rollout_logprobs)):
        _check_bt(name, t, shape)
    if advantages.dim() not in (1, 2) or tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(f"advantages must be [B] = [{shape[0]}] or [B, T] = {list(shape)}, "
                         f"got {list(advantages.shape)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy (compute_entropy=True)")
    if rollout_is not in ROLLOUT_IS:
        raise ValueError(f"rollout_is must be one of {ROLLOUT_IS}, got {rollout_is!r}")
    if rollout_is == "tis" and rollout_logprobs is None:
        raise ValueError("rollout_is='tis' needs rollout_logprobs (the generator's log-probs)")
    if rollout_is == "tis" and not rollout_is_cap > 0:
        raise ValueError(f"rollout_is_cap must be > 0, got {rollout_is_cap}")

    dtype = _compute_dtype(logp.dtype)  # bf16/fp16 stats are upcast like logits are
    logp, logp_exec, z_exec = logp.to(dtype), logp_exec.to(dtype), z_exec.to(dtype)
    m = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    agg = lambda x: aggregate(x, m, aggregation, norm_constant)  # noqa: E731

    # Sanitize masked slots first so that padding garbage (NaN, +-inf) can never reach the loss.
    adv = advantages.detach().to(dtype)
    adv = adv[:, None].expand(shape) if adv.dim() == 1 else adv
    adv = torch.where(m, adv, zero)
    old = logp.detach() if old_logprobs is None else torch.where(m, old_logprobs.detach().to(dtype), logp.detach())

    # --- policy term: PPO clip (clip-higher, DAPO) + dual-clip for A < 0 --------------------------
    log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    pg_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        # For A < 0, -A r grows without bound in r: cap it at -A * dual_clip (Ye et al. 2020).
        pg_loss = torch.where(adv < 0, torch.minimum(pg_loss, -adv * dual_clip), pg_loss)

    # --- rollout-vs-trainer mismatch: ratio old / rollout; TIS weights each token's loss by it, capped
    rollout_ratio = is_weight = None
    if rollout_logprobs is not None:
        rollout = torch.where(m, rollout_logprobs.detach().to(dtype), old)
        rollout_log_ratio = (old - rollout).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        rollout_ratio = rollout_log_ratio.exp()
        if rollout_is == "tis":
            is_weight = rollout_ratio.clamp(max=rollout_is_cap)
            pg_loss = pg_loss * is_weight  # before sg(l_t) below, so the surrogate scales with it

    with torch.no_grad():
        r = ratio.detach()
        clipped_low = (adv < 0) & (r < 1.0 - clip_low)
        clipped_high = (adv > 0) & (r > 1.0 + clip_high)
        dual = (adv < 0) & (r > dual_clip) if dual_clip is not None else torch.zeros_like(m)
        unclipped = ~(clipped_low | clipped_high | dual)

    # --- hierarchical surrogate: c_t = (sg(1 - p) - 1[y != E]) * log Z -----------------------------
    # log Z (logsumexp over non-E) = z_E - log p + log(1 - p), from the full logsumexp already inside
    # logp_exec: no second pass over the vocabulary and no fourth per-token tensor (a direct non-E
    # logsumexp would need either). log(1 - p) via log1mexp, which never cancels; what remains is the
    # logsumexp's own rounding (~eps * |lse|), a relative error eps * |lse| / (1 - p) in 1 - p. It only
    # matters for p -> 1, where c_t for y = E is scaled by sg(1 - p) ~ 0, and y != E is rarely sampled.
    p_exec = logp_exec.exp()
    log_z = z_exec - logp_exec + _log1mexp(logp_exec)
    not_exec = (labels != execute_token_id).to(dtype)
    c = ((1.0 - p_exec).detach() - not_exec) * log_z
    weight = pg_loss.detach()  # sg(l_t)
    if not surrogate_on_clipped:
        weight = torch.where(unclipped, weight, zero)
    cm = m if c_mask is None else (c_mask.bool() & m)
    surrogate_tok = torch.where(cm, c * weight, zero)

    policy_loss = agg(pg_loss)
    surrogate = agg(surrogate_tok)
    loss = policy_loss + lam * surrogate if lam != 0.0 else policy_loss  # lam = 0: exactly plain GRPO

    # --- optional KL to a reference policy (k3, Schulman) and entropy bonus --------------------------
    kl_ref = None
    if ref_logprobs is not None:
        ref = torch.where(m, ref_logprobs.detach().to(dtype), logp.detach())
        d = (ref - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl_ref = agg(d.exp() - d - 1.0)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl_ref
    ent = agg(entropy.to(dtype)) if entropy is not None else None
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * ent

    # --- stats: one host sync for all of them --------------------------------------------------------
    with torch.no_grad():
        n = m.sum().clamp(min=1).to(dtype)
        tmean = lambda x: torch.where(m, x.to(dtype), zero).sum() / n  # noqa: E731
        vals = {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "surrogate": surrogate.detach(),
            "clip_frac_low": tmean(clipped_low),
            "clip_frac_high": tmean(clipped_high),
            "clip_frac": tmean(clipped_low | clipped_high),
            "dual_clip_frac": tmean(dual),
            "approx_kl": tmean(r - 1.0 - log_ratio.detach()),  # k3 estimate of KL(old || new)
            "ratio_mean": tmean(r),
            "ratio_max": torch.where(m, r, zero).max() if r.numel() else zero,
            "p_execute": tmean(p_exec.detach()),
            "c_mask_frac": tmean(cm),
            "n_tokens": m.sum().to(dtype),
        }
        if rollout_ratio is not None:
            has = m.any()
            vals["rollout_logp_absdiff"] = tmean(rollout_log_ratio.abs())
            vals["rollout_ratio_max"] = torch.where(has, torch.where(m, rollout_ratio, -math.inf).amax(), 1.0)
            vals["rollout_ratio_min"] = torch.where(has, torch.where(m, rollout_ratio, math.inf).amin(), 1.0)
        if is_weight is not None:
            vals["rollout_is_weight_mean"] = tmean(is_weight)
            vals["rollout_is_capped_frac"] = tmean(rollout_ratio > rollout_is_cap)
        if kl_ref is not None:
            vals["kl_ref"] = kl_ref.detach()
        if ent is not None:
            vals["entropy"] = ent.detach()
        stats = dict(zip(vals, torch.stack([v.to(dtype) for v in vals.values()]).tolist()))
    return loss, stats


def ih_grpo_loss(
    logits: Tensor,
    labels: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    execute_token_id: int,
    lam: float = 1e-3,
    old_logprobs: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    aggregation: str = "token-mean",
    c_mask: Tensor | None = None,
    kl_coef: float = 0.0,
    ref_logprobs: Tensor | None = None,
    entropy_coef: float = 0.0,
    norm_constant: float | None = None,
    surrogate_on_clipped: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    rollout_logprobs: Tensor | None = None,
    rollout_is: str = "none",
    rollout_is_cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """IH-GRPO loss from logits [B, T, V] (already temperature-scaled, aligned with labels [B, T]).

    = token_stats_from_logits + ih_grpo_loss_from_stats (see there for every argument). The loss is
    float64 for float64 logits and float32 otherwise. lam = 0 is plain GRPO/DAPO, lam = 1 EH-GRPO.
    Entropy is computed only when entropy_coef != 0.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {list(logits.shape)}")
    shape = tuple(logits.shape[:2])
    _check_bt("labels", labels, shape)
    _check_bt("mask", mask, shape)
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    vocab = logits.shape[-1]
    bad = ((labels < 0) | (labels >= vocab)) & mask.bool()
    if bool(bad.any()):
        raise ValueError(f"trainable positions have labels outside [0, {vocab})")
    labels_safe = torch.where(mask.bool(), labels, torch.zeros_like(labels))  # masked ids may be anything
    stats = token_stats_from_logits(logits, labels_safe, execute_token_id, compute_entropy=entropy_coef != 0.0,
                                    chunk_size=chunk_size)
    return ih_grpo_loss_from_stats(
        stats.logp, stats.logp_exec, stats.z_exec, labels, advantages, mask,
        execute_token_id=execute_token_id, lam=lam, old_logprobs=old_logprobs, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, aggregation=aggregation, c_mask=c_mask, kl_coef=kl_coef,
        ref_logprobs=ref_logprobs, entropy=stats.entropy, entropy_coef=entropy_coef,
        norm_constant=norm_constant, surrogate_on_clipped=surrogate_on_clipped,
        rollout_logprobs=rollout_logprobs, rollout_is=rollout_is, rollout_is_cap=rollout_is_cap,
    )


__all__ = [
    "AGGREGATIONS",
    "ROLLOUT_IS",
    "TokenStats",
    "aggregate",
    "chunked_token_stats",
    "decision_c_mask",
    "ih_grpo_loss",
    "ih_grpo_loss_from_stats",
    "token_stats_from_logits",
]
