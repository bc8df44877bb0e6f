"""The precision policy (`model.dtype`): what the weights are stored in, what the matmuls run in.

    auto      fp32 master weights, gradients and AdamW state; on a GPU, bf16 autocast around
              every forward pass, the rollout's included (so keys/values are computed in bf16).
              On a CPU: fp32 throughout (CPU bf16 is slow and changes nothing about correctness).
    float32   fp32 throughout, no autocast.
    bfloat16  bf16 weights end to end: weights, gradients and AdamW state in bf16, no autocast.
              Half the memory of `auto`, but an update smaller than a weight's bf16 resolution
              (about 1/256 of it) is lost: at the paper's lr 1e-6 most updates would be. Prefer
              `auto` (with FSDP or LoRA to fit) unless memory leaves no choice.
    float16   fp16 weights end to end, no loss scaling: for inference-like experiments only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["Precision", "WEIGHT_DTYPES", "precision_policy"]

WEIGHT_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # the parameters (and their gradients and optimizer state)
    autocast: torch.dtype | None = None  # the autocast dtype of forward passes; None: no autocast

    @property
    def compute(self) -> torch.dtype:
        """The dtype matmuls (and so keys/values) run in."""
        return self.autocast or self.weights

    @property
    def weights_name(self) -> str:
        return str(self.weights).removeprefix("torch.")

    @property
    def mixed_precision(self) -> str:
        """accelerate's `mixed_precision` for this policy."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast, "no")

    def context(self, device_type: str):
        """The autocast context for a forward pass on `device_type` (a no-op without autocast)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast)


def precision_policy(dtype: str, device_type: str) -> Precision:
    """The policy of `model.dtype` = `dtype` on a `device_type` ("cuda", "cpu", ...) device."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    if dtype == "auto" and device_type == "cuda":
        return Precision(torch.float32, torch.bfloat16)
    return Precision(WEIGHT_DTYPES[dtype])
