"""LoRA through PEFT: adapters on the policy and checkpoints that hold only the adapters. The
loader side (base + adapter, merged, for `ihgrpo eval` and `ihgrpo export`) is in ihgrpo.models.

PEFT injects the adapters into the model in place; the trainer keeps using the injected Hugging
Face model (``PeftModel.get_base_model()``: its forward includes the adapters and keeps the
transformers signature the generator and the chunked loss need). The :class:`Adapters` object
keeps the PEFT wrapper for what only it knows: turning the adapters off (the KL reference is the
base model, no copy) and writing ``adapter_config.json`` / ``adapter_model.safetensors``.

A checkpoint's ``model/`` directory then holds the adapter, the tokenizer, and in
``adapter_config.json`` the base model: a Hugging Face name, an absolute directory, or a path
relative to ``model/`` (``../../../base``: the run's own copy of a base that came from memory).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ihgrpo.config import ConfigError, LoraSection
from ihgrpo.models import ADAPTER_WEIGHTS, quiet_peft

__all__ = ["Adapters", "apply_lora", "base_for_checkpoints", "require_peft"]

PEFT_MISSING = "LoRA (lora.r > 0) needs the peft package: pip install 'ihgrpo[lora]'"


def require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(PEFT_MISSING) from None
    return peft


class Adapters:
    """The PEFT wrapper of a model trained with LoRA."""

    def __init__(self, peft_model, base: str | None = None):
        self.peft_model = peft_model
        self.base = base  # what checkpoints name as the base model (see base_for_checkpoints)

    @property
    def model(self) -> nn.Module:
        """The Hugging Face model with the adapters injected (the one to train and sample)."""
        return self.peft_model.get_base_model()

    def disabled(self):
        """A context in which the model is the base model (the adapters contribute nothing)."""
        return self.peft_model.disable_adapter()

    def save(self, directory: str | Path, state: dict[str, torch.Tensor]) -> None:
        """Writes the adapter from `state` (the injected model's names, as `model.state_dict()`
        gives them; only the adapters' entries are used) and names the base model."""
        self.peft_model.peft_config["default"].base_model_name_or_path = self.base
        prefixed = {f"base_model.model.{k}": v for k, v in state.items() if "lora_" in k}
        # save_embedding_layers=False: the vocabulary is never resized, the adapters are all there is.
        self.peft_model.save_pretrained(str(directory), state_dict=prefixed, safe_serialization=True,
                                        save_embedding_layers=False)

    def load_state(self, directory: str | Path) -> dict[str, torch.Tensor]:
        """The adapter weights of a saved `directory`, under the injected model's names."""
        from safetensors.torch import load_file

        path = Path(directory) / ADAPTER_WEIGHTS
        if not path.is_file():
            raise ConfigError(f"{directory} holds no LoRA adapter ({ADAPTER_WEIGHTS}): was the run trained "
                              "with lora.r=0? Resume it with the same lora settings")
        saved = load_file(path)
        state = self.model.state_dict()
        live = {f"base_model.model.{k.replace('.default', '')}": k for k in state if "lora_" in k}
        if set(saved) != set(live) or any(v.shape != state[live[k]].shape for k, v in saved.items()):
            extra, missing = sorted(set(saved) - set(live)), sorted(set(live) - set(saved))
            raise ConfigError(f"the adapter in {directory} does not match lora settings (missing {missing[:2]}, "
                              f"unexpected {extra[:2]}): resume with the run's lora.r and lora.target_modules")
        return {live[k]: v for k, v in saved.items()}


def apply_lora(model: nn.Module, section: LoraSection, *, tokenizer=None, source: str | None = None,
               run_dir: str | Path | None = None, write: bool = False) -> Adapters | None:
    """Injects LoRA adapters into `model` (in place) and freezes everything else; None when
    `section.r` is 0. With `run_dir`, first settles the base that checkpoints will name
    (:func:`base_for_checkpoints`: `source`, else a copy of `model` written to RUN/base)."""
    if section.r == 0:
        return None
    peft = require_peft()
    base = None if run_dir is None else base_for_checkpoints(model, tokenizer, source, Path(run_dir), write=write)
    targets = "all-linear" if list(section.target_modules) == ["all-linear"] else list(section.target_modules)
    cfg = peft.LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
    try:
        with quiet_peft():
            peft_model = peft.get_peft_model(model, cfg)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise ConfigError(f"lora.target_modules: {str(exc).splitlines()[0][:200]}") from None
    head = peft_model.get_base_model().get_output_embeddings()
    if head is not None and any("lora_" in n for n, _ in head.named_parameters()):
        raise ConfigError("lora.target_modules: the output layer cannot take an adapter (the chunked loss "
                          "reads its weight directly); leave it out or use all-linear")
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers < 5: the old name
    if checkpointing if checkpointing is not None else getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    return Adapters(peft_model, base)


def base_for_checkpoints(model: nn.Module, tokenizer, source: str | None, run_dir: Path, *, write: bool) -> str:
    """What a LoRA checkpoint names as its base model: `source` (the hub name or directory the
    model was loaded from), else the run's own copy, written once to RUN/base (by the process
    with `write`) and named relative to a checkpoint's model/ directory."""
    if source:
        return os.path.abspath(source) if os.path.isdir(source) else source
    base = Path(run_dir) / "base"
    if write and not (base / "config.json").is_file():
        tmp = Path(run_dir) / ".tmp-base"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)  # a copy a kill left incomplete
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, base)
    return os.path.join("..", "..", "..", "base")  # from RUN/checkpoints/step-N/model

