"""A demo run: its numbers do not depend on the SFT cache; a missing optional package loses nothing."""

from __future__ import annotations

import json
import sys

import torch

from ihgrpo.demo.pipeline import (DemoSettings, demo_examples, evaluate, heldout_problems, rl_config, run_demo,
                                  sft_start)
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


def test_a_finished_demo_without_matplotlib_writes_everything_else(tmp_path, monkeypatch):
    """`pip install .` without the plot package used to lose a six-minute run to an ImportError
    at the very end, with no rollouts.html."""
    monkeypatch.setenv("IHGRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    messages = []
    result = run_demo(tmp_path / "demo", settings=TINY, log=messages.append)
    out = tmp_path / "demo"
    assert json.loads((out / "metrics.json").read_text())["after"] == result["after"]
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    assert "<html" in (out / "rollouts.html").read_text()
    assert not (out / "curves.png").exists()
    notes = [m for m in messages if "matplotlib" in m]
    assert len(notes) == 1 and "curves.png" in notes[0] and "\n" not in notes[0]


def test_compare_figure_and_eval_chart_without_matplotlib(tmp_path, monkeypatch):
    from ihgrpo.demo.compare import plot_bars
    from ihgrpo.demo.pipeline import _optional_figure
    from ihgrpo.eval.report import write_chart

    table = {"IH-GRPO": {"accuracy_mean": 0.5, "accuracy_ci95": [0.4, 0.6]}}
    messages = []
    assert _optional_figure(tmp_path / "compare.png", messages.append,
                            lambda path: plot_bars(table, path))
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG" and not messages
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not _optional_figure(tmp_path / "again.png", messages.append,
                                lambda path: plot_bars(table, path))
    assert not (tmp_path / "again.png").exists()
    assert messages == ["[demo] note: no again.png: the package 'matplotlib' is not installed (pip install matplotlib)"]
    results = {"benchmarks": {"x": {"avg@k": 0.5, "pass@k": 1.0, "k": 2}}, "mean_of_benchmarks": 0.5,
               "settings": {"model": "m", "protocol": "delayed"}}
    assert write_chart(tmp_path / "chart.png", results) is False


def test_the_main_jobs_packages_are_core_dependencies():
    """`pip install .` (no extras) then `ihgrpo demo` must have what the demo writes its figure with."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert {"matplotlib", "torch", "transformers", "accelerate", "rich", "pyyaml"} <= core
