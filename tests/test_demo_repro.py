"""The demo's numbers do not depend on whether its SFT start came from the cache."""

from __future__ import annotations

import json

import torch

from ihgrpo.demo.pipeline import DemoSettings, demo_examples, evaluate, heldout_problems, rl_config, sft_start
from ihgrpo.trainer import GRPOTrainer

TINY = DemoSettings(
    name="tiny", min_steps=2, max_steps=3, sft_steps=3, copy_steps=2, n_heldout=4, n_curve=0,
    model=(("hidden_size", 32), ("num_hidden_layers", 1), ("num_attention_heads", 2), ("num_key_value_heads", 1),
           ("head_dim", 16), ("intermediate_size", 64)),
    rl=("max_steps=2", "save_every=2", "prompts_per_step=2", "rollout.group_size=4", "rollout.max_turns=2",
        "rollout.max_response_tokens=48", "rollout.max_tokens_per_turn=24", "rollout.temperature=1.0",
        "log.progress=false", "optim.micro_batch_size=4"))


def _run(out, settings):
    """SFT start (cached or not) -> greedy held-out eval -> two RL steps; the numbers."""
    model, tok = sft_start(settings=settings, log=lambda m: None)
    cfg = rl_config(out, (), settings)
    before = evaluate(model, tok, heldout_problems(settings=settings), max_turns=cfg.rollout.max_turns)
    flip = iter(range(10**6))

    def reward(answers, golds):  # alternate rewards: every group has signal, so both steps update
        return [float(next(flip) % 2) for _ in answers]

    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, examples=demo_examples("train", settings=settings),
                          reward_fn=reward)
    try:
        history = trainer.train()
    finally:
        trainer.close()
    history = [{k: v for k, v in m.items() if "time" not in k} for m in history]
    return {"before": before["accuracy"], "history": history,
            "weights": [p.detach().clone() for p in model.parameters()]}


def test_rl_from_the_cached_sft_start_equals_rl_from_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.setenv("IHGRPO_CACHE", str(tmp_path / "cache"))
    fresh = _run(tmp_path / "fresh", TINY)  # trains the SFT start and caches it
    assert any((tmp_path / "cache" / "demo-sft").glob("*/DONE"))
    cached = _run(tmp_path / "cached", TINY)  # loads it from the cache
    assert fresh["before"] == cached["before"]
    assert json.dumps(fresh["history"], sort_keys=True) == json.dumps(cached["history"], sort_keys=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh["weights"], cached["weights"]))
