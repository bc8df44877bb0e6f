"""``ihgrpo eval``: the options, the settings they make, and the exit statuses."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ihgrpo.config import EvalConfig, load_eval_config

from .benchmarks import EvalError
from .ledger import LEDGER

__all__ = ["add_eval_arguments", "config_from_args", "cmd_eval", "main"]


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ihgrpo eval``."""
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a local model directory or a Hugging Face name (the tokenizer comes from it too; "
                             "any causal LM: the delayed protocol adds <tool_call> where the vocabulary lacks it)")
    parser.add_argument("--benchmark", action="append", required=True, metavar="SPEC",
                        help="demo | paper | other | math500 | olympiad (the release's 500 of 674) | "
                             "olympiad-full | ... | NAME=FILE (.parquet, .jsonl); repeatable")
    parser.add_argument("--k", type=int, default=None, help="samples per problem (default: 8 for math500 and "
                        "olympiad, 32 for aime24, aime25, amc23 and hmmt25, else 8)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    parser.add_argument("--protocol", choices=("delayed", "coupled"), default=None,
                        help="delayed (D, default) or coupled (C) code execution")
    parser.add_argument("--top-p", dest="top_p", type=float, default=None, help="nucleus sampling (default 0.7)")
    parser.add_argument("--backend", choices=("auto", "hf", "vllm"), default=None,
                        help="generation: vllm (pip install 'ihgrpo[vllm]'), hf (transformers), or auto "
                             "(default: vllm when installed and a GPU is present, else hf)")
    parser.add_argument("--max-response-tokens", dest="max_response_tokens", type=int, default=None, metavar="N",
                        help="the token budget of a sample after its prompt: model tokens and observations, all "
                             "turns (rollout.max_response_tokens, default 8000). It bounds every turn too: a turn "
                             "gets max_tokens_per_turn (default none) or what is left of N, whichever is smaller")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="settings file (model, rollout and eval sections, as in training configs); "
                             "the options and key=value settings override it")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder; rerun to resume. Several GPUs: torchrun --nproc_per_node N "
                             "-m ihgrpo.cli eval ... (one process per GPU, the same samples as one process)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings by bare or dotted name: temperature, top_p, top_k, max_turns, "
                             "max_response_tokens, max_observation_tokens, exec_timeout_s, batch_size, seed, "
                             "data_dir, sandbox_workers, ... (rollout.max_turns=3, eval.batch_size=8)")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Layers: the defaults, ``--config``, ``--model``, the ``key=value`` settings, then the other
    options (an option wins over a key=value setting)."""
    items = [f"model.path={args.model}"] if getattr(args, "model", None) else []
    items += list(getattr(args, "overrides", None) or [])
    for key, dotted in (("k", "eval.k"), ("limit", "eval.limit"), ("protocol", "rollout.mode"),
                        ("top_p", "rollout.top_p"), ("backend", "rollout.backend"),
                        ("max_response_tokens", "rollout.max_response_tokens")):
        value = getattr(args, key, None)
        if value is not None:
            items.append(f"{dotted}={value}")
    cfg = load_eval_config(getattr(args, "config", None), items)
    if not cfg.model.path:
        raise EvalError("no model given (--model PATH, or model.path in --config)")
    return cfg


def _usage_errors() -> tuple[type[Exception], ...]:
    from ihgrpo.config import ConfigError
    from ihgrpo.data import DataError
    from ihgrpo.models import ModelLoadError
    from ihgrpo.rollout.vllm import BackendUnavailable
    from ihgrpo.sandbox import SandboxUnavailable

    return (EvalError, ConfigError, DataError, ModelLoadError, SandboxUnavailable, BackendUnavailable)


def cmd_eval(args: argparse.Namespace) -> int:
    """``ihgrpo eval``: 0 on success, 2 (one line on stderr) for bad input, 130 when interrupted."""
    from .runner import run_eval

    try:
        cfg = config_from_args(args)
        run_eval(cfg, args.out, benchmarks=args.benchmark)
    except _usage_errors() as exc:
        msg = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
        print(f"ihgrpo eval: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ihgrpo eval: interrupted; rerun the same command to resume from {Path(args.out) / LEDGER}",
              file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ihgrpo eval", description="Evaluate a model on benchmarks.")
    add_eval_arguments(parser)
    return cmd_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
