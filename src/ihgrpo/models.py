"""Loading a causal LM and its tokenizer, and what generation needs to know about them.

The one home of model loading for training and evaluation. A name registered as a model
(:mod:`ihgrpo.registry`, e.g. ``demo``, registered by the demo package) is built by its
registered function; anything else is a local directory or a Hugging Face name.
"""

from __future__ import annotations

import os

from ihgrpo import registry

__all__ = ["ModelLoadError", "load_model_and_tokenizer", "load_tokenizer_and_generation_config", "eos_token_ids"]


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded; the message names the path."""


def load_model_and_tokenizer(path: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                             attn_implementation: str | None = None):
    """A causal LM and its tokenizer from a registered name, a local directory or a Hugging Face name."""
    if not path:
        raise ModelLoadError("no model given (model.path)")
    loader = registry.lookup("model", path)
    if loader is not None:  # a named source, e.g. the demo's cached SFT start
        return loader()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = _check_path(path)
    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    kw = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32, **kw)
    except Exception as exc:  # transformers raises OSError, ValueError, HFValidationError...
        raise _load_error(path, local, exc) from None
    return model, tokenizer


def load_tokenizer_and_generation_config(path: str, *, trust_remote_code: bool = False):
    """The tokenizer and generation config of a directory or Hugging Face name, without the weights
    (for an inference engine that loads them itself). The generation config is None when absent."""
    from transformers import AutoTokenizer, GenerationConfig

    local = _check_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error(path, local, exc) from None
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except Exception:  # none saved: EOS comes from the tokenizer
        generation_config = None
    return tokenizer, generation_config


def _check_path(path: str) -> bool:
    """Whether `path` is local; a ModelLoadError for a path-like name that does not exist."""
    local = os.path.exists(path)
    if not local and (path.startswith(("/", ".", "~")) or os.sep + os.sep in path or path.count("/") > 1):
        raise ModelLoadError(f"model path {path!r} does not exist")
    return local


def _load_error(path: str, local: bool, exc: Exception) -> ModelLoadError:
    where = "local directory" if local else "model (not a local directory; the hub is needed)"
    return ModelLoadError(f"cannot load {where} {path!r}: {str(exc).splitlines()[0][:200]}")


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the model's generation config's EOS ids, then the tokenizer's."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids
