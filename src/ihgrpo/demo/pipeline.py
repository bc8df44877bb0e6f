"""The embedded main job: a tiny model learns delayed tool use on CPU in minutes.

    ihgrpo demo --out DIR            SFT warm start (cached) -> IH-GRPO -> held-out before/after
    ihgrpo demo --compare --out DIR  IH-GRPO vs GRPO-D vs EH-GRPO vs GRPO-C, same budget (demo/compare.py)
    ihgrpo train demo [key=value]    the RL stage as an ordinary training run

Everything is real: the task generator, the tokenizer, the Qwen3-architecture model, the
sandboxed execution, the trainer. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ihgrpo.data import Example

HELDOUT_SEED = "heldout"


@dataclass(frozen=True)
class DemoSettings:
    """Everything that sizes a demo run besides the RL config (configs/demo.yaml).

    ``full()`` is ``ihgrpo demo``; ``quick()`` is the reduced run CI uses to check that RL
    really improves the policy (``ihgrpo demo --quick``, about two minutes).
    """

    name: str = "full"
    min_steps: int = 3  # problem lengths (steps); the generator can go to 7
    max_steps: int = 5
    # no digit sums (the longest code to write, and the op the model confused most)
    ops: tuple[str, ...] = ("mul", "add", "sub", "square", "cube", "pow", "div", "mod", "last3", "range")
    max_value: int = 10 ** 10  # answers of up to 10 digits, copied into \\boxed{} digit by digit
    model: tuple[tuple[str, Any], ...] = ()  # build_model overrides, e.g. (("hidden_size", 96),)
    sft_steps: int = 450
    copy_steps: int = 300
    n_heldout: int = 64  # problems in the before / after evaluations
    n_curve: int = 32  # problems in the evaluations along the RL curve (0: none)
    rl: tuple[str, ...] = ()  # RL overrides applied before the user's

    @classmethod
    def full(cls) -> "DemoSettings":
        # 3 to 5 steps: after the SFT budget the 0.9 M-parameter model copies 6- and 7-step
        # problems right only about one time in five (greedy), and RL cannot make up for it.
        return cls()

    @classmethod
    def quick(cls) -> "DemoSettings":
        # 3-step problems and 3 turns: a stepwise policy (4 turns) never fits, a deferring one does.
        # The model keeps its size: a smaller one did not learn to copy within the budget.
        return cls(name="quick", min_steps=3, max_steps=3, sft_steps=200, copy_steps=300, n_heldout=32,
                   n_curve=0, rl=("rollout.max_turns=3", "max_steps=10", "save_every=10", "prompts_per_step=6",
                                  "optim.lr=2e-4"))

    def task(self):
        from .task import TaskConfig

        return TaskConfig(min_steps=self.min_steps, max_steps=self.max_steps, ops=self.ops,
                          max_value=self.max_value)

    def sft_config(self):
        from .sft import DEFAULT_STYLE_WEIGHTS, SFTConfig

        # explicit weights, so that the cache key changes with them
        return SFTConfig(steps=self.sft_steps, copy_steps=self.copy_steps, task=self.task(),
                         style_weights=dict(DEFAULT_STYLE_WEIGHTS))


# ----------------------------------------------------------------------------- data
def demo_examples(split: str = "train", limit: int | None = None, seed: str = "rl",
                  settings: DemoSettings | None = None) -> list[Example]:
    """Demo problems as Examples ("heldout" never shares a question with "train")."""
    from .task import generate_problems

    settings = settings or DemoSettings.full()
    n = limit or (settings.n_heldout if split != "train" else 4096)
    name = "test" if split in ("heldout", "test") else "train"
    seed = HELDOUT_SEED if name == "test" else seed
    return [Example(p.question, p.answer, f"demo-{name}-{i}", "demo")
            for i, p in enumerate(generate_problems(n, seed=seed, split=name, cfg=settings.task()))]


def heldout_problems(n: int | None = None, settings: DemoSettings | None = None):
    from .task import generate_problems

    settings = settings or DemoSettings.full()
    return generate_problems(n or settings.n_heldout, seed=HELDOUT_SEED, split="test", cfg=settings.task())


# ----------------------------------------------------------------------------- SFT start
def _cache_root() -> Path:
    base = os.environ.get("IHGRPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ihgrpo")
    return Path(base) / "demo-sft"


def sft_key(settings: DemoSettings) -> str:
    import transformers

    import ihgrpo

    blob = json.dumps({"sft": asdict(settings.sft_config()), "model": list(settings.model),
                       "ihgrpo": ihgrpo.__version__, "torch": torch.__version__.split("+")[0],
                       "transformers": transformers.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_start(cache_dir: str | Path | None = None, *, fresh: bool = False, log=print,
              settings: DemoSettings | None = None):
    """The SFT warm start (model, tokenizer): loaded from the cache, or trained and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import build_model, count_parameters
    from .sft import train_sft
    from .tokenizer import build_tokenizer

    settings = settings or DemoSettings.full()
    cfg = settings.sft_config()
    path = Path(cache_dir) if cache_dir else _cache_root() / sft_key(settings)
    if not fresh and (path / "DONE").exists():
        log(f"[demo] reusing the cached SFT start: {path}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    tok = build_tokenizer()
    model = build_model(tok, seed=cfg.seed, **dict(settings.model))
    log(f"[demo] SFT warm start: {count_parameters(model) / 1e6:.2f} M parameters, vocabulary {len(tok)}, "
        f"copy warm-up {cfg.copy_steps} steps, then {cfg.steps} steps of {cfg.batch_size} traces")
    res = train_sft(model, tok, cfg, log=lambda m: log(f"[demo] {m}"))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "sft.json").write_text(json.dumps({"final_loss": res.final_loss, "steps": res.steps,
                                              "time_s": res.time_s, "style_counts": res.style_counts}))
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return model.eval(), tok


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, problems, *, max_turns: int, temperature: float = 0.0, seed: int = 0,
             mode: str = "delayed", return_trajectories: bool = False) -> dict:
    from .sft import demo_rollout_config, evaluate_model

    stats = evaluate_model(model, tokenizer, problems, max_turns=max_turns, temperature=temperature, seed=seed,
                           rollout_config=demo_rollout_config(max_turns, mode=mode),
                           return_trajectories=return_trajectories)
    return stats


def summary(stats: dict) -> dict:
    return {"accuracy": stats["accuracy"], "delay_call_rate": stats["delay_call_rate"],
            "tool_calls_per_trajectory": stats["tool_calls_per_trajectory"],
            "turns_per_trajectory": stats["turns_per_trajectory"],
            "response_tokens": stats["response_tokens"]}


# ----------------------------------------------------------------------------- RL
def exact_int_reward(answers, golds) -> list[float]:
    from .sft import score_answer

    return [score_answer(a, g) for a, g in zip(answers, golds)]


def rl_config(out_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
              settings: DemoSettings | None = None):
    """configs/demo.yaml with the settings' RL overrides, then the caller's."""
    from ihgrpo.config import load_config

    settings = settings or DemoSettings.full()
    return load_config("demo", [f"output_dir={out_dir}", *settings.rl, *overrides])


def run_rl(model, tokenizer, cfg, *, curve_problems=None, settings: DemoSettings | None = None,
           eval_every: int | None = None) -> list[dict]:
    """IH-GRPO (by default) from the SFT start, with a held-out curve along the way (every
    ``eval_every`` steps, default a fifth of the run, and after the last); ``cfg`` is an :func:`rl_config`."""
    from ihgrpo.trainer import GRPOTrainer

    settings = settings or DemoSettings.full()
    eval_fn = None
    if curve_problems:
        def eval_fn(m):
            return summary(evaluate(m, tokenizer, curve_problems, max_turns=cfg.rollout.max_turns,
                                    mode=cfg.rollout.mode))
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tokenizer, examples=demo_examples("train", settings=settings),
                          reward_fn=exact_int_reward, eval_fn=eval_fn,
                          eval_every=eval_every or max(1, cfg.max_steps // 5))
    try:
        return trainer.train()
    finally:
        trainer.close()


def plot_curves(history: list[dict], path: Path, before: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("reward", "training reward (mean over rollouts)"),
              ("eval/accuracy", "held-out accuracy"),
              ("rollout/delay_call_rate", "delay-call rate (training rollouts)"),
              ("rollout/tool_calls_per_trajectory", "tool calls per trajectory")]
    for ax, (key, title) in zip(axes.flat, panels):
        xs = [s for s, m in zip(steps, history) if key in m]
        ys = [m[key] for m in history if key in m]
        if key == "eval/accuracy" and before is not None:
            xs, ys = [0] + xs, [before["accuracy"]] + ys
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str | Path, *, overrides=(), fresh: bool = False, log=print,
             settings: DemoSettings | None = None) -> dict:
    """SFT start -> held-out eval -> RL -> held-out eval; writes metrics.json, curves.png, model/,
    rollouts.html in out_dir."""
    from ihgrpo.viewer import write_viewer

    settings = settings or DemoSettings.full()
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = sft_start(fresh=fresh, log=log, settings=settings)
    t_sft = time.perf_counter() - t_start
    cfg = rl_config(out / "rl", overrides, settings)
    turns = cfg.rollout.max_turns
    heldout = heldout_problems(settings=settings)
    t0 = time.perf_counter()
    before = evaluate(model, tok, heldout, max_turns=turns, mode=cfg.rollout.mode)
    log(f"[demo] held-out before RL: accuracy {before['accuracy']:.3f}, delay-call rate "
        f"{before['delay_call_rate']:.2f}, tool calls {before['tool_calls_per_trajectory']:.2f} "
        f"({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    history = run_rl(model, tok, cfg, curve_problems=heldout[:settings.n_curve], settings=settings)
    t_rl = time.perf_counter() - t0
    after = evaluate(model, tok, heldout, max_turns=turns, mode=cfg.rollout.mode, return_trajectories=True)
    trajs = after.pop("trajectories")
    log(f"[demo] held-out after RL:  accuracy {after['accuracy']:.3f}, delay-call rate "
        f"{after['delay_call_rate']:.2f}, tool calls {after['tool_calls_per_trajectory']:.2f}")
    result = {"before": summary(before), "after": summary(after),
              "heldout_problems": len(heldout), "rl_steps": len(history),
              "settings": {"demo": settings.name, "algorithm": "IH-GRPO", "lam": cfg.algo.lam,
                           "max_turns": turns, "problem_steps": [settings.min_steps, settings.max_steps],
                           "rl_temperature": cfg.rollout.temperature, "eval_temperature": 0.0,
                           "overrides": [*settings.rl, *overrides]},
              "time_s": {"sft": t_sft, "rl": t_rl, "total": time.perf_counter() - t_start}}
    # What needs only the core first; a figure last, and a missing plotting package costs only it.
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    write_viewer(out / "rollouts.html", trajs[:12], tok, title="ihgrpo demo: held-out rollouts after RL")
    written = ["metrics.json", "model/", "rollouts.html"]
    if _optional_figure(out / "curves.png", log, lambda path: plot_curves(history, path, before=before)):
        written.insert(1, "curves.png")
    log(f"[demo] wrote {', '.join(written)} in {out} ({result['time_s']['total']:.0f} s)")
    return result


def _optional_figure(path: Path, log, plot) -> bool:
    """``plot(path)``; without its package, one line saying what is missing instead of a
    traceback that would end a finished run."""
    try:
        plot(path)
    except ImportError as exc:
        name = getattr(exc, "name", None) or "matplotlib"
        log(f"[demo] note: no {path.name}: the package {name!r} is not installed (pip install {name})")
        return False
    return True

