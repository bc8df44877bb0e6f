"""Loading a causal LM and its tokenizer, and what generation needs to know about them.

The one home of model loading for training and evaluation. A name registered as a model
(:mod:`ihgrpo.registry`, e.g. ``demo``, registered by the demo package) is built by its
registered function; anything else is a local directory or a Hugging Face name. A training
checkpoint (RUN/checkpoints/step-N) loads its model/ directory, and a LoRA adapter
directory loads as its base with the adapter merged in.
"""

from __future__ import annotations

import contextlib
import os
import warnings

from ihgrpo import registry

__all__ = ["ModelLoadError", "load_model_and_tokenizer", "load_tokenizer_and_generation_config", "eos_token_ids",
           "checkpoint_model_dir", "is_adapter_dir"]

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names, which LoRA checkpoints use
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded; the message names the path."""


def load_model_and_tokenizer(path: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                             attn_implementation: str | None = None):
    """A causal LM and its tokenizer from a registered name, a local directory or a Hugging Face name."""
    if not path:
        raise ModelLoadError("no model given (model.path)")
    from ihgrpo.precision import WEIGHT_DTYPES  # imports torch: not at module level

    loader = registry.lookup("model", path)
    if loader is not None:  # a named source, e.g. the demo's cached SFT start; auto: as it builds it
        model, tokenizer = loader()
        return (model if dtype == "auto" else model.to(WEIGHT_DTYPES[dtype])), tokenizer
    path = checkpoint_model_dir(path)  # a training checkpoint: its model/
    if is_adapter_dir(path):  # a LoRA checkpoint: its base (loaded by this function) + the adapter, merged
        return _load_adapter_model(path, lambda base: load_model_and_tokenizer(
            base, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = _check_path(path)
    kw = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=WEIGHT_DTYPES[dtype], **kw)
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


# ----------------------------------------------------------------------------- checkpoints, LoRA
def is_adapter_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def checkpoint_model_dir(path: str) -> str:
    """`path` itself, or the model directory of a training checkpoint (`RUN/checkpoints/step-N`).
    Not a run's "latest" checkpoint: an evaluation ledger keyed by the path would then mix two
    checkpoints' samples."""
    p = os.path.join(path, "model")
    if os.path.isdir(p) and os.path.isfile(os.path.join(path, "state.json")):
        return p
    return path


def _load_adapter_model(path: str, load_base) -> tuple:
    """(model, tokenizer) of a LoRA adapter directory: its base (through `load_base`) with the
    adapter merged in, so that generation runs at the base model's speed. adapter_config.json
    names the base: a hub name, an absolute directory, or a path relative to `path` (a run's own
    copy of a base that came from memory, RUN/base)."""
    import json

    try:
        import peft
    except ImportError:
        raise ModelLoadError(f"{path} is a LoRA checkpoint; loading it needs peft: pip install 'ihgrpo[lora]'") from None
    try:
        base = json.loads(open(os.path.join(path, ADAPTER_CONFIG)).read()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {os.path.join(path, ADAPTER_CONFIG)}: {exc}") from None
    if not base:
        raise ModelLoadError(f"the LoRA adapter {path} does not name its base model (base_model_name_or_path)")
    if not os.path.isabs(base) and os.path.isdir(os.path.join(path, base)):
        base = os.path.normpath(os.path.join(path, base))
    model, tokenizer = load_base(base)
    try:
        with quiet_peft():
            model = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    except Exception as exc:  # a mismatched or damaged adapter
        raise ModelLoadError(f"cannot apply the LoRA adapter {path!r} to {base!r}: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers 5 for a renamed attribute (a FutureWarning per call); not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
