"""The update diagnostic of the lambda study: where does an update move the logits at E positions?

At a position where the policy sampled the execute token E, write the next-token distribution as
the two-level policy it is under IH-GRPO: p = softmax(z)[E] (execute now or not) and q = softmax of
the non-E logits (what to write instead). The explicit two-level policy (lambda = 1) credits the
execute decision to the E logit alone, so the gradient at an E token leaves q untouched; plain GRPO
(lambda = 0) also pushes q, by -(1 - p) q (losses.py). With logits z before and z' after an update:

    q_kl     = KL(q || q')                                   0 for lambda = 1 on free logits
    e_share  = d_E^2 / (d_E^2 + Var_q(dz))                   1 for lambda = 1 on free logits

where dz = z' - z and d_E = dz_E - E_q[dz] is the change of the log-odds of E against the rest (to
first order); Var_q(dz) over the non-E tokens is twice the first-order KL(q || q'). Both are
averaged over the positions. In a network the other tokens' gradients move the shared weights, so
q moves at E positions for every lambda: the diagnostic measures how much less it moves.

The trainer computes them behind ``log.update_diagnostics`` (two extra no-grad forwards per step,
full-vocabulary logits only at the E positions).
"""

from __future__ import annotations

import torch
from torch import Tensor


def q_shift_stats(before: Tensor, after: Tensor, execute_token_id: int, prefix: str = "diag/") -> dict[str, float]:
    """{q_kl_at_E, e_share_at_E, e_positions} from [N, V] logits (already divided by the sampling
    temperature) at the same N positions before and after an update; no positions: only the count."""
    if before.shape != after.shape or before.dim() != 2:
        raise ValueError(f"before and after must be the same [N, V]; got {tuple(before.shape)} and "
                         f"{tuple(after.shape)}")
    n = before.shape[0]
    if n == 0:
        return {f"{prefix}e_positions": 0.0}
    z0, z1 = before.double(), after.double()
    rest = torch.ones(z0.shape[-1], dtype=torch.bool, device=z0.device)
    rest[execute_token_id] = False
    lq0 = torch.log_softmax(z0[:, rest], -1)
    lq1 = torch.log_softmax(z1[:, rest], -1)
    q0 = lq0.exp()
    kl = (q0 * (lq0 - lq1)).sum(-1).clamp_min(0.0)
    dz = z1 - z0
    mean_rest = (q0 * dz[:, rest]).sum(-1)
    var_rest = (q0 * (dz[:, rest] - mean_rest[:, None]) ** 2).sum(-1)
    d_e2 = (dz[:, execute_token_id] - mean_rest) ** 2
    share = torch.where(d_e2 + var_rest > 1e-24, d_e2 / (d_e2 + var_rest).clamp_min(1e-300), torch.ones_like(d_e2))
    return {f"{prefix}q_kl_at_E": kl.mean().item(), f"{prefix}e_share_at_E": share.mean().item(),
            f"{prefix}e_positions": float(n)}


def decoder_and_head(model):
    """(the decoder stack returning hidden states, the output layer) of a HF causal LM."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return base, model.get_output_embeddings()


@torch.no_grad()
def logits_at(model, input_ids: Tensor, attention_mask: Tensor, select: Tensor, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary logits / temperature, float32, at the positions ``select`` [B, L-1] (position t
    predicts token t + 1), in eval mode: [N, V], never [B, L, V]."""
    base, head = decoder_and_head(model)
    was_training = model.training
    model.eval()
    try:
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        h = hidden[:, :-1][select.bool()]
        with torch.autocast(h.device.type, enabled=False):  # float32 as said: autocast would round z to bf16
            z = torch.nn.functional.linear(h.float(), head.weight.float(),
                                           None if getattr(head, "bias", None) is None else head.bias.float())
    finally:
        model.train(was_training)
    return z / temperature


class UpdateProbe:
    """Logits at a step's trained E tokens before the update (built before the optimizer step);
    ``after()`` reads them again and returns :func:`q_shift_stats` (this process's tokens only)."""

    def __init__(self, trainer, trajs, keep):
        from ihgrpo.trainer import _to, collate  # here: the trainer imports this module

        mb, self.trainer, self.E = trainer.cfg.optim.micro_batch_size, trainer, trainer.execute_token_id
        self.batches = [_to(collate(trajs[s:s + mb], [0.0] * len(trajs[s:s + mb]), trainer.pad_id, keep[s:s + mb],
                                    self.E), trainer.accelerator.device) for s in range(0, len(trajs), mb)]
        self.before = self._logits()

    def _logits(self) -> Tensor:
        t = self.trainer
        with t.dist.full_params(t.policy), t._autocast():  # FSDP: every rank gathers, then each probes its rows
            return torch.cat([logits_at(t._model(), b.input_ids, b.attention_mask,
                                        (b.labels == self.E) & (b.mask > 0), t.cfg.rollout.temperature)
                              for b in self.batches])

    def after(self) -> dict[str, float]:
        return q_shift_stats(self.before, self._logits(), self.E)
