"""The one place that picks a generation backend: ``rollout.backend: hf | vllm | auto``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .generator import Generator

BACKENDS = ("hf", "vllm", "auto")


def resolve_backend(backend: str) -> str:
    """"hf" or "vllm"; "auto" is vllm when vLLM is installed and a GPU is present, else hf."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; use one of {BACKENDS}")
    if backend != "auto":
        return backend
    import torch

    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "hf"


def make_generator(backend: str, model, tokenizer, *, pad_token_id: int | None = None, seed: int | None = None,
                   vllm: dict[str, Any] | None = None) -> Generator:
    """A generator sampling from `model` (`backend` as :func:`resolve_backend` takes it).

    "hf" runs the trainer's module itself (nothing to synchronise). "vllm" starts a colocated vLLM
    engine (:meth:`VLLMGenerator.for_model`, options from `vllm`, e.g. :func:`vllm_options`) that
    receives the trainer's weights through ``sync_weights``; without vLLM installed it raises
    BackendUnavailable, a one-line error naming ``pip install 'ihgrpo[vllm]'``.
    """
    backend = resolve_backend(backend)
    if backend == "hf":
        from .hf import HFGenerator

        return HFGenerator(model, tokenizer, pad_token_id=pad_token_id, seed=seed)
    from .vllm import VLLMGenerator

    return VLLMGenerator.for_model(model, tokenizer, **(vllm or {}))


def vllm_options(rollout, *, dtype: str, seed: int, trust_remote_code: bool = False,
                 output_dir: str | Path | None = None, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """`VLLMGenerator.launch` / `for_model` options from a config's rollout section (the one place
    for training and evaluation). With `output_dir`, a training run's engine for this process: each
    rank gets its own engine on its own device (vLLM's external launcher) and its own directory, and
    sleeps during the update (rollout.vllm_sleep_level). Without, an evaluation engine: never sleeps."""
    from .vllm import logprobs_mode_for

    opts = {"seed": seed + rank, "logprobs_mode": logprobs_mode_for(rollout.temperature),
            "gpu_memory_utilization": rollout.vllm_gpu_memory_utilization,
            "dtype": "bfloat16" if dtype == "auto" else dtype, "trust_remote_code": trust_remote_code}
    if rollout.vllm_max_model_len is not None:
        opts["max_model_len"] = rollout.vllm_max_model_len
    if output_dir is not None:
        opts.update(workdir=Path(output_dir) / "vllm-engine" / f"rank{rank}", distributed=world > 1,
                    sleep_level=rollout.vllm_sleep_level)
    return opts
