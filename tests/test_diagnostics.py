"""The update diagnostic: the non-E distribution q at E positions, before vs after an update."""

import json

import pytest
import torch

from ihgrpo.diagnostics import q_shift_stats
from ihgrpo.losses import ih_grpo_loss

E = 3


def _sgd_step(lam: float, labels: torch.Tensor, lr: float = 5.0):
    """One SGD step on free logits [B, T, V] under the IH-GRPO loss; (before, after) at E labels."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 5)
    adv = torch.tensor([1.0, -0.7])
    loss, _ = ih_grpo_loss(z, labels, adv, mask, execute_token_id=E, lam=lam)
    loss.backward()
    with torch.no_grad():
        z1 = z - lr * z.grad
    sel = labels == E
    return z.detach()[sel], z1[sel]


def test_lambda_one_leaves_q_at_e_positions_unchanged_and_lambda_zero_does_not():
    labels = torch.tensor([[E, 1, E, 4, E], [0, E, 2, E, 5]])
    s1 = q_shift_stats(*_sgd_step(1.0, labels), execute_token_id=E)
    s0 = q_shift_stats(*_sgd_step(0.0, labels), execute_token_id=E)
    sm = q_shift_stats(*_sgd_step(1e-3, labels), execute_token_id=E)
    assert s1["diag/e_positions"] == s0["diag/e_positions"] == 5
    # lambda = 1: the gradient at an E token is (1 - p) e_E, so only the E logit moves
    assert s1["diag/q_kl_at_E"] < 1e-15 and s1["diag/e_share_at_E"] == pytest.approx(1.0, abs=1e-12)
    # lambda = 0 (GRPO): -(1 - p) q moves q too
    assert s0["diag/q_kl_at_E"] > 1e-4 and s0["diag/e_share_at_E"] < 1 - 1e-3
    # small lambda: q moves almost as much as under GRPO
    assert sm["diag/q_kl_at_E"] > 0.9 * s0["diag/q_kl_at_E"]


def test_q_shift_stats_edge_cases():
    z = torch.randn(4, 7, dtype=torch.float64)
    s = q_shift_stats(z, z + 2.5, E)  # a shift of every logit changes nothing
    assert s["diag/q_kl_at_E"] == pytest.approx(0.0, abs=1e-12)
    assert s["diag/e_share_at_E"] == 1.0  # no change at all counts as "nothing moved q"
    moved = z.clone()
    moved[:, E] += 1.0  # only E moves: q intact, all of the change on E
    s = q_shift_stats(z, moved, E)
    assert s["diag/q_kl_at_E"] == pytest.approx(0.0, abs=1e-12) and s["diag/e_share_at_E"] == pytest.approx(1.0)
    assert q_shift_stats(z[:0], z[:0], E) == {"diag/e_positions": 0.0}
    with pytest.raises(ValueError, match="same"):
        q_shift_stats(z, z[:2], E)


def test_trainer_logs_the_diagnostic_only_when_asked(tmp_path):
    from test_trainer import EXAMPLES, _cfg, _tiny

    from ihgrpo.trainer import GRPOTrainer

    def run(out, *extra):
        tok, model = _tiny()
        old = model.get_output_embeddings()  # a biased head that samples E often, so that E positions exist
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.zero_()
            head.bias[tok.convert_tokens_to_ids("<tool_call>")] = 3.0
        model.set_output_embeddings(head)
        flip = iter(range(10 ** 6))
        trainer = GRPOTrainer(_cfg(out, "max_steps=1", *extra), model=model, tokenizer=tok, examples=EXAMPLES,
                              reward_fn=lambda a, g: [float(next(flip) % 2) for _ in a])
        try:
            trainer.train()
        finally:
            trainer.close()
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    off = run(tmp_path / "off")
    assert not any(k.startswith("diag/") for k in off)
    on = run(tmp_path / "on", "log.update_diagnostics=true")
    assert on["diag/e_positions"] > 0
    assert on["diag/q_kl_at_E"] > 0 and 0 < on["diag/e_share_at_E"] <= 1


def test_logits_at_stay_float32_under_autocast():
    """The probe's logits are float32 even inside the trainer's bf16 autocast (else q_kl reads rounding)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ihgrpo.diagnostics import logits_at

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, intermediate_size=64))
    ids = torch.randint(0, 64, (2, 6))
    select = torch.ones(2, 5, dtype=torch.bool)
    plain = logits_at(model, ids, torch.ones_like(ids), select)
    with torch.autocast("cpu", torch.bfloat16):
        z = logits_at(model, ids, torch.ones_like(ids), select)
    assert z.dtype == torch.float32 and z.shape == (10, 64)
    hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # fp32 reference
    assert torch.allclose(plain, model.lm_head(hidden)[:, :-1].reshape(-1, 64), atol=1e-5)
