"""Command line: `ihgrpo train | eval | demo | export`.

    ihgrpo train CONFIG [key=value ...]   CONFIG: a YAML path or a packaged name (qwen3-1.7b, ...)
    ihgrpo eval --model PATH --benchmark SPEC ... --out DIR [key=value ...]
    ihgrpo demo [--out DIR] [key=value ...]   the embedded main job
    ihgrpo export --checkpoint C --out DIR   a checkpoint as one model directory (LoRA merged)

Options and key=value settings may come in any order.
Configuration, data and model errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import ihgrpo.demo  # noqa: F401  (the wiring: registers the demo's named sources, e.g. model.path: demo)


def _usage_errors() -> tuple[type[Exception], ...]:
    from ihgrpo.config import ConfigError
    from ihgrpo.data import DataError
    from ihgrpo.rollout.vllm import BackendUnavailable
    from ihgrpo.sandbox import SandboxUnavailable
    from ihgrpo.models import ModelLoadError

    return (ConfigError, DataError, ModelLoadError, SandboxUnavailable, BackendUnavailable)


def cmd_train(args: argparse.Namespace) -> int:
    from ihgrpo.config import load_config
    from ihgrpo.trainer import GRPOTrainer

    cfg = load_config(args.config, args.overrides)
    trainer = GRPOTrainer(cfg)
    try:
        history = trainer.train()
    finally:
        trainer.close()
    if history:
        last = history[-1]
        print(f"done: step {last['step']}, reward {last.get('reward', 0):.3f}; metrics in "
              f"{cfg.output_dir}/metrics.jsonl")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ihgrpo.eval.cli import cmd_eval as run

    return run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ihgrpo.config import ConfigError
    from ihgrpo.models import load_model_and_tokenizer

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; export into a new directory")
    # The loader resolves a checkpoint to its model/ and merges a LoRA adapter into its base.
    model, tokenizer = load_model_and_tokenizer(args.checkpoint, dtype=args.dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"exported {args.checkpoint} to {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          "parameters); load it with ihgrpo eval --model or transformers' from_pretrained")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.walkthrough:
        from ihgrpo.demo.walkthrough import main as walkthrough

        return walkthrough(args.out)
    import torch

    from ihgrpo.config import ConfigError
    from ihgrpo.demo.compare import run_compare
    from ihgrpo.demo.pipeline import DemoSettings, run_demo

    if "OMP_NUM_THREADS" not in os.environ:
        # At most two threads: a 1-M-parameter model gains nothing from more, and oversubscribed
        # OpenMP threads on a busy machine are many times slower than one.
        torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))
    out = args.out or ("runs/demo-compare" if args.compare else "runs/demo")
    settings = DemoSettings.quick() if args.quick else DemoSettings.full()
    if args.compare:
        from ihgrpo.demo.compare import parse_lams

        try:
            lams, cm_lams = parse_lams(args.lams), parse_lams(args.cmask_decision_lams, "--cmask-decision-lams")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        run_compare(out, overrides=args.overrides, seeds=args.seeds, lams=lams, coupled=not args.no_coupled,
                    cmask_decision_lams=cm_lams, curve_evals=args.curve_evals, settings=settings)
    else:
        run_demo(out, overrides=args.overrides, fresh=args.fresh, settings=settings)
    return 0


def _parse(parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser],
           argv: list[str] | None) -> argparse.Namespace:
    """Options and ``key=value`` settings in any order: argparse hands back the settings that
    follow an option as unrecognized, so they join the overrides in the order given; any other
    leftover is an error (exit 2)."""
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if bad:
        commands[args.command].error(f"unrecognized arguments: {' '.join(bad)} (settings are written key=value)")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ihgrpo", description="IH-GRPO: train and evaluate "
                                     "language models that reason with deferred code execution.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="RL training (GRPO / IH-GRPO)")
    train.add_argument("config", help="a YAML path or a packaged config name")
    train.add_argument("overrides", nargs="*", help="key=value overrides (e.g. algo.lam=0 max_steps=10)")
    from ihgrpo.eval.cli import add_eval_arguments

    add_eval_arguments(sub.add_parser("eval", help="evaluate a model on benchmarks (avg@k, pass@k)"))
    export = sub.add_parser("export", help="write a checkpoint as a plain model directory (LoRA merged into its base)")
    export.add_argument("--checkpoint", required=True,
                        help="a checkpoint (RUN/checkpoints/step-N), its model/ directory, or any model directory")
    export.add_argument("--out", required=True, help="a new directory for the model and tokenizer")
    export.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights' dtype (auto: float32)")
    demo = sub.add_parser("demo", help="run the embedded main job: a tiny model learns delayed tool use")
    demo.add_argument("--out", default=None, help="directory for the outputs (default runs/demo)")
    demo.add_argument("--quick", action="store_true",
                      help="the reduced run CI uses: smaller model and task, a few RL steps (about 2 minutes)")
    demo.add_argument("--fresh", action="store_true", help="retrain the SFT start instead of reusing the cache")
    demo.add_argument("--compare", action="store_true",
                      help="IH-GRPO vs GRPO-D vs EH-GRPO vs GRPO-C on the same budget (resumable: reruns "
                           "skip the runs already in DIR/runs.jsonl)")
    demo.add_argument("--seeds", type=int, default=2, help="seeds per method with --compare")
    demo.add_argument("--lams", default=None, metavar="L1,L2,...",
                      help="with --compare: one IH-GRPO row per lambda (0 = GRPO-D, 1 = EH-GRPO) instead of "
                           "the default 1e-3,0,1")
    demo.add_argument("--cmask-decision-lams", default=None, metavar="L1,...",
                      help="with --compare: add rows with c_mask=decision at these lambdas")
    demo.add_argument("--no-coupled", action="store_true", help="with --compare: leave out GRPO-C")
    demo.add_argument("--curve-evals", type=int, default=5,
                      help="with --compare: held-out curve evaluations per run (0: none)")
    demo.add_argument("--walkthrough", action="store_true",
                      help="only the scripted protocol walkthrough (no training; seconds)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the RL stage (configs/demo.yaml)")
    args = _parse(parser, sub.choices, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "export": cmd_export}
    try:
        return handlers[args.command](args)
    except _usage_errors() as exc:
        print(f"ihgrpo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
