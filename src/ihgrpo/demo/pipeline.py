"""The embedded main job: a tiny model learns delayed tool use on CPU in minutes.

    ihgrpo demo --out DIR            SFT warm start (cached) -> IH-GRPO -> held-out before/after
    ihgrpo demo --compare --out DIR  IH-GRPO vs GRPO-D vs EH-GRPO vs GRPO-C, same budget
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
from dataclasses import asdict
from pathlib import Path

import torch

from ihgrpo.data import Example

HELDOUT_SEED = "heldout"
N_HELDOUT = 64  # problems in the held-out evaluation
N_CURVE = 32  # problems in the evaluations along the RL curve


# ----------------------------------------------------------------------------- data
def demo_examples(split: str = "train", limit: int | None = None, seed: str = "rl") -> list[Example]:
    """Demo problems as Examples ("heldout" never shares a question with "train")."""
    from .task import generate_problems

    n = limit or (N_HELDOUT if split != "train" else 4096)
    name = "test" if split in ("heldout", "test") else "train"
    seed = HELDOUT_SEED if name == "test" else seed
    return [Example(p.question, p.answer, f"demo-{name}-{i}", "demo")
            for i, p in enumerate(generate_problems(n, seed=seed, split=name))]


def heldout_problems(n: int = N_HELDOUT):
    from .task import generate_problems

    return generate_problems(n, seed=HELDOUT_SEED, split="test")


# ----------------------------------------------------------------------------- SFT start
def _cache_root() -> Path:
    base = os.environ.get("IHGRPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ihgrpo")
    return Path(base) / "demo-sft"


def sft_settings():
    from .sft import SFTConfig

    return SFTConfig()


def sft_key(cfg) -> str:
    import transformers

    import ihgrpo

    blob = json.dumps({"sft": asdict(cfg), "ihgrpo": ihgrpo.__version__, "torch": torch.__version__.split("+")[0],
                       "transformers": transformers.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_start(cache_dir: str | Path | None = None, *, fresh: bool = False, log=print):
    """The SFT warm start (model, tokenizer): loaded from the cache, or trained and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import build_model, count_parameters
    from .sft import train_sft
    from .tokenizer import build_tokenizer

    cfg = sft_settings()
    path = Path(cache_dir) if cache_dir else _cache_root() / sft_key(cfg)
    if not fresh and (path / "DONE").exists():
        log(f"[demo] reusing the cached SFT start: {path}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    tok = build_tokenizer()
    model = build_model(tok, seed=cfg.seed)
    log(f"[demo] SFT warm start: {count_parameters(model) / 1e6:.2f} M parameters, vocabulary {len(tok)}, "
        f"{cfg.steps} steps of {cfg.batch_size} traces")
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
