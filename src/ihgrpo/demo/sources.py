"""The demo's registered sources (see ``ihgrpo/demo/__init__.py``): its data and its benchmark."""

from __future__ import annotations

from .pipeline import demo_examples


def examples(name: str, limit: int | None = None):
    """``demo`` / ``demo:train``: the training split; ``demo:heldout``: the held-out problems."""
    return demo_examples("heldout" if name.endswith("heldout") else "train", limit=limit)


def heldout_benchmark(name: str, cfg):
    """``ihgrpo eval --benchmark demo``: the held-out set, with the demo's instruction and
    budgets as a layer under the user's settings."""
    from ihgrpo.eval.benchmarks import Benchmark, Problem

    from .sft import demo_rollout_config

    problems = [Problem(i, e.question, e.answer)
                for i, e in enumerate(examples("demo:heldout", limit=cfg.eval.limit))]
    r = demo_rollout_config()
    defaults = {"rollout.max_turns": r.max_turns, "rollout.max_response_tokens": r.max_response_tokens,
                "rollout.max_tokens_per_turn": r.max_tokens_per_turn, "rollout.instruction": r.instruction}
    return Benchmark(name, problems, "demo:heldout", defaults=defaults)
