"""`VLLMGenerator`: rollouts on a vLLM engine (optional extra: ``pip install 'ihgrpo[vllm]'``).

**Not exercised by our tests.** No environment our checks run in has vLLM (CPU CI, and its wheel
cannot reach the GPU test machine). What the tests check is this adapter against a fake engine
that returns vLLM's documented structures (tests/test_vllm_generator.py).

Pinned to vLLM 0.32 (``vllm>=0.32,<0.33``), read at 0.32.0: it requires torch==2.13.0 (our CPU
pin) and transformers>=5.16.1,<5.20 (installing it moves a newer transformers back into that range;
our code supports transformers>=4.51). 0.33 moves to torch 2.14.

How a call maps onto vLLM 0.32 (``vllm.LLM.generate``, ``vllm.SamplingParams``, ``vllm.outputs``):

* Prompts are ``TokensPrompt(prompt_token_ids=prefix)``: token ids in, nothing re-tokenized.
* One ``vllm.SamplingParams`` per request: ``n=1``, temperature / top_p / top_k (0 = off in both),
  ``max_tokens`` = the request's budget, our ``stop_token_ids``, ``ignore_eos=True`` (vLLM otherwise
  also stops at the model's EOS and generation_config's EOS ids; ours stop only at the caller's ids,
  and the rollout engine lists EOS), ``logprobs=0`` (vLLM always returns the sampled token's
  log-prob, plus the top ``logprobs`` ones: 0 = the sampled token's only), the request's seed, and
  ``detokenize=False``. vLLM matches stop strings only in detokenized text (it rejects ``stop`` with
  ``detokenize=False``), so a call with stop strings detokenizes, with ``skip_special_tokens=False``,
  ``spaces_between_special_tokens=False`` and ``include_stop_str_in_output=True``: the text matched
  is the text the model wrote, as HFGenerator matches it.
* ``RequestOutput.outputs[0]``: ``token_ids`` (a stop token is kept; after a stop string, the tokens
  up to the one completing it), ``logprobs`` (one ``dict[token_id, Logprob(logprob, rank,
  decoded_token)]`` per token), ``finish_reason`` ("stop", "length", "abort", "error",
  "repetition") and ``stop_reason`` (the stop token id, the stop string, or None for EOS). "stop"
  with an int is our "stop_token", with a str "stop_string"; "length" is "length"; anything else
  (an aborted request) raises.

Log-probs. vLLM's engine setting ``logprobs_mode`` decides what ``logprobs`` hold:
``raw_logprobs`` (its default) is log_softmax of the model's logits, before temperature and top-k/
top-p; ``processed_logprobs`` is after temperature *and* top-k/top-p (renormalised over the kept
tokens). Ours (HFGenerator, and what the loss recomputes) is log_softmax(logits / temperature)
before top-k/top-p. So raw_logprobs are ours exactly at temperature 1 (or 0: greedy is unscaled in
both), processed_logprobs exactly when top_k = 0 and top_p = 1; :func:`logprobs_mode_for` picks the
exact one for a sampling setting. Neither is exact at temperature != 1 with top-k/top-p: then
processed_logprobs are log p(y) - log(mass kept) (the distribution actually sampled), the outputs
say ``extra["logprobs_exact"] = False`` and a warning says so once. Either way the values come from
vLLM's kernels in the engine's dtype: the trainer measures the remaining mismatch every step
(``loss/rollout_logp_absdiff``, ``loss/rollout_ratio_max``) and can correct for it (``algo.rollout_is=tis``).

Seeds: vLLM 0.32 draws each request's random numbers from its own seed and position, so a request
with a seed samples the same whatever else is in the batch: ``seeds[i]`` (one per prefix) is request
i's vLLM seed. Without ``seeds``, a call with ``params.seed`` gives request i the seed
``derive_seed(params.seed, i)``; with neither, vLLM picks seeds itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .generator import GenerationOutput, Generator, SamplingParams, check_seeds, derive_seed

log = logging.getLogger(__name__)

__all__ = ["BackendUnavailable", "VLLM_REQUIREMENT", "VLLMGenerator", "engine_weights", "import_vllm",
           "logprobs_mode_for"]

VLLM_REQUIREMENT = "vllm>=0.32,<0.33"
_PINNED_MINOR = (0, 32)


class BackendUnavailable(ImportError):
    """A generation backend that is not installed; the one-line message says how to install it."""


def import_vllm():
    """The vllm module, or a one-line BackendUnavailable naming the extra to install."""
    try:
        import vllm
    except ImportError as exc:
        raise BackendUnavailable(f"the vLLM backend needs vLLM ({VLLM_REQUIREMENT}), which is not installed "
                                 f"({exc}): pip install 'ihgrpo[vllm]'") from None
    version = tuple(int(x) for x in getattr(vllm, "__version__", "0.0").split(".")[:2] if x.isdigit())
    if version[:2] != _PINNED_MINOR:
        log.warning("vLLM %s is installed; ihgrpo's adapter was written against %s",
                    getattr(vllm, "__version__", "?"), VLLM_REQUIREMENT)
    return vllm


def logprobs_mode_for(temperature: float) -> str:
    """The vLLM ``logprobs_mode`` for sampling at `temperature`: raw_logprobs are ours at 0 and 1
    (whatever top-k/top-p); otherwise processed_logprobs, ours when top-k/top-p are off."""
    return "raw_logprobs" if temperature in (0.0, 1.0) else "processed_logprobs"


def _exact(mode: str, params: SamplingParams) -> bool:
    if params.temperature in (0.0, 1.0) and mode == "raw_logprobs":
        return True
    return mode == "processed_logprobs" and (params.temperature == 0.0 or (params.top_p == 1.0 and params.top_k == 0))


class VLLMGenerator(Generator):
    """A :class:`Generator` over a ``vllm.LLM`` (see the module docstring for the exact mapping).

    Build it with :meth:`launch` (or :meth:`for_model` for a colocated training engine), or wrap an
    existing ``llm``. ``sleep_level`` 1 or 2 puts the engine to sleep in :meth:`sleep` (vLLM needs
    ``enable_sleep_mode=True``); 0 makes ``sleep`` a no-op. Level 2 discards the weights, so the
    next ``generate`` needs a :meth:`sync_weights` first (it raises otherwise).
    ``weights_loaded=False``: the engine holds placeholder weights (``load_format="dummy"``) until
    the first ``sync_weights``.
    """

    def __init__(self, llm: Any, *, vllm_module: Any = None, logprobs_mode: str | None = None,
                 sleep_level: int = 0, weights_loaded: bool = True):
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0 (never sleep), 1 or 2, got {sleep_level}")
        self.llm = llm
        self._vllm = vllm_module if vllm_module is not None else import_vllm()
        model_config = getattr(llm, "model_config", None)
        self.logprobs_mode = logprobs_mode or getattr(model_config, "logprobs_mode", None) or "raw_logprobs"
        self.sleep_level = sleep_level
        self._state = "awake"  # "awake", "asleep" or "weights" (weights woken, KV cache not yet)
        self._weights_valid = weights_loaded
        self._warned_inexact = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def launch(cls, model: str, *, in_process: bool = False, distributed: bool = False,
               sleep_level: int = 0, logprobs_mode: str = "raw_logprobs", seed: int = 0,
               weights_loaded: bool = True, **engine_kwargs) -> VLLMGenerator:
        """Start a ``vllm.LLM`` on `model` (a path or a hub name).

        ``in_process``: the engine's worker runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
        which :meth:`sync_weights` needs (it hands tensors over by reference). ``distributed``: one
        engine per rank of the running torchrun/accelerate job, each on its own device
        (``distributed_executor_backend="external_launcher"``, which is in-process too).
        `engine_kwargs` go to ``vllm.LLM`` (``gpu_memory_utilization``, ``max_model_len``, ``dtype``...).
        """
        vllm = import_vllm()
        if in_process or distributed:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if distributed:
            # One independent engine per rank, read in vLLM 0.32.0's source: with the external
            # launcher, initialize_model_parallel lays the torchrun world out as ExternalDP x DP x
            # PP x PCP x TP, and "ExternalDP" ranks "generate independently" (parallel_state.py);
            # tensor/pipeline/data parallel sizes of 1 make each rank its own group of one. Not
            # data_parallel_size=world, as examples/offline_inference/torchrun_dp_example.py does for
            # an MoE model: then every engine step all-reduces whether any DP rank has requests
            # left (LLMEngine.has_unfinished_requests_dp) and idle ranks run dummy batches, so ranks
            # making different numbers of generate calls (multi-turn rollouts) would hang.
            # The only cross-rank collective left is at start-up (the free-memory MIN, executed by
            # every rank as it builds its engine).
            for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
                if engine_kwargs.setdefault(key, 1) != 1:
                    raise ValueError(f"one vLLM engine per rank needs {key}=1, got {engine_kwargs[key]}")
            engine_kwargs["distributed_executor_backend"] = "external_launcher"
        if sleep_level:
            engine_kwargs["enable_sleep_mode"] = True
        llm = vllm.LLM(model=model, seed=seed, logprobs_mode=logprobs_mode, **engine_kwargs)
        return cls(llm, vllm_module=vllm, logprobs_mode=logprobs_mode, sleep_level=sleep_level,
                   weights_loaded=weights_loaded)

    @classmethod
    def for_model(cls, model, tokenizer, workdir: str | Path, **kwargs) -> VLLMGenerator:
        """A colocated engine for training `model`: vLLM starts from `model`'s config and
        `tokenizer` (written to `workdir`) with placeholder weights; the trainer's weights arrive
        with the first :meth:`sync_weights`. Works for any model object, e.g. one built in memory."""
        import_vllm()  # fail before writing anything
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        base = _base_model(model)
        base.config.save_pretrained(workdir)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(workdir)
        tokenizer.save_pretrained(workdir)
        return cls.launch(str(workdir), in_process=True, load_format="dummy", weights_loaded=False, **kwargs)

    # ------------------------------------------------------------------ the Generator interface
    def generate(self, prefixes: list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None, *, request_ids: list[str] | None = None,  # noqa: ARG002
                 seeds: list[int] | None = None) -> list[GenerationOutput]:
        limits = self._validate(prefixes, params, max_new_tokens)
        check_seeds(seeds, len(prefixes))
        if not prefixes:
            return []
        self._wake()
        exact = _exact(self.logprobs_mode, params)
        if not exact and not self._warned_inexact:
            self._warned_inexact = True
            log.warning("vLLM's %s are not ihgrpo's log-probs at temperature %s with top_p %s / top_k %s "
                        "(see ihgrpo.rollout.vllm); the trainer's mismatch metrics show by how much",
                        self.logprobs_mode, params.temperature, params.top_p, params.top_k)
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prefixes]
        if seeds is not None:
            request_seeds = [int(s) & (2**63 - 1) for s in seeds]  # vLLM keeps seeds in an int64 array
        else:
            request_seeds = [None if params.seed is None else derive_seed(params.seed, i) for i in range(len(limits))]
        sampling = [self._sampling_params(params, limit, seed) for limit, seed in zip(limits, request_seeds)]
        results = self.llm.generate(prompts, sampling, use_tqdm=False)
        if len(results) != len(prefixes):
            raise RuntimeError(f"vLLM returned {len(results)} outputs for {len(prefixes)} prompts")
        return [self._convert(r, params, exact) for r in results]

    def sync_weights(self, model) -> None:
        """Load `model`'s weights (Hugging Face names, LoRA merged in) into the engine, in place.

        Needs the engine's worker in this process (``launch(in_process=True)`` or ``distributed``):
        the tensors are handed to vLLM's ``reload_weights`` by reference, not serialized."""
        if self._state == "asleep":
            self.llm.wake_up(tags=["weights"])
            self._state = "weights"
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": engine_weights(model),
                                                          "is_checkpoint_format": True})
        if self._state == "awake":  # asleep, the prefix cache was dropped already
            self.llm.reset_prefix_cache()  # its KV entries were computed with the old weights
        self._weights_valid = True

    def sleep(self) -> None:
        if not self.sleep_level or self._state == "asleep":
            return
        self.llm.sleep(level=self.sleep_level)
        self._state = "asleep"
        if self.sleep_level == 2:
            self._weights_valid = False

    # ------------------------------------------------------------------ internals
    def _wake(self) -> None:
        if not self._weights_valid:
            raise RuntimeError("the vLLM engine holds no weights (started with placeholder weights or put to "
                               "sleep at level 2): call sync_weights(model) before generate")
        if self._state == "awake":
            return
        self.llm.wake_up(tags=["kv_cache"] if self._state == "weights" else None)
        self._state = "awake"

    @staticmethod
    def _validate(prefixes, params, max_new_tokens) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.temperature > 2.0:
            raise ValueError(f"vLLM accepts temperatures in [0, 2], got {params.temperature}")
        for i, p in enumerate(prefixes):
            if len(p) == 0:
                raise ValueError(f"prefix {i} is empty: every prefix needs at least one token")
        if max_new_tokens is None:
            return [params.max_new_tokens] * len(prefixes)
        limits = [int(m) for m in max_new_tokens]
        if len(limits) != len(prefixes):
            raise ValueError(f"max_new_tokens has {len(limits)} entries for {len(prefixes)} prefixes")
        if any(m < 1 for m in limits):
            raise ValueError(f"max_new_tokens entries must be >= 1, got {min(limits)}")
        return limits

    def _sampling_params(self, params: SamplingParams, limit: int, seed: int | None):
        text = bool(params.stop_strings)
        kwargs = {}
        if text:
            kwargs.update(stop=list(params.stop_strings), skip_special_tokens=False,
                          spaces_between_special_tokens=False, include_stop_str_in_output=True)
        return self._vllm.SamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, max_tokens=limit,
            stop_token_ids=list(params.stop_token_ids), ignore_eos=True, logprobs=0,
            seed=seed, detokenize=text, **kwargs)

    @staticmethod
    def _convert(result, params: SamplingParams, exact: bool) -> GenerationOutput:
        out = result.outputs[0]
        ids = [int(t) for t in out.token_ids]
        if out.logprobs is None or len(out.logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {len(ids)} tokens but "
                               f"{'no' if out.logprobs is None else len(out.logprobs)} log-prob entries")
        lps = [float(pos[t].logprob) for pos, t in zip(out.logprobs, ids)]
        stop_string = None
        if out.finish_reason == "length":
            reason = "length"
        elif out.finish_reason == "stop" and isinstance(out.stop_reason, str):
            reason, stop_string = "stop_string", out.stop_reason
        elif out.finish_reason == "stop" and ids and ids[-1] in params.stop_token_ids:
            reason = "stop_token"
        else:
            raise RuntimeError(f"vLLM request {getattr(result, 'request_id', '?')} ended with finish_reason "
                               f"{out.finish_reason!r} (stop_reason {out.stop_reason!r})")
        extra = {} if exact else {"logprobs_exact": False}
        return GenerationOutput(token_ids=ids, logprobs=lps, finish_reason=reason, stop_string=stop_string,
                                extra=extra)


def _base_model(model):
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def _has_peft_layers(model) -> bool:
    """Whether PEFT injected layers into `model` (a LoRA layer or a modules_to_save copy). The
    trainer trains and syncs the injected model itself (Adapters.model), not the PeftModel."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # no peft: nothing can have been injected
        return False
    return any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in model.modules())


def engine_weights(model) -> Iterator[tuple[str, Any]]:
    """`model`'s parameters under its Hugging Face checkpoint names, for ``load_weights``.

    A PEFT model (or a model with PEFT's layers injected) gives its base model's names with every active LoRA adapter merged in
    (W + get_delta_weight), computed here: the model is not modified (merging and unmerging in
    place would drift the trainer's weights by rounding). modules_to_save copies replace the
    originals. Tied parameters come once, as ``named_parameters`` lists them.
    """
    import torch

    base = _base_model(model)
    peft = _has_peft_layers(base)  # a PeftModel, or the model with its adapters injected
    deltas: dict[str, Any] = {}
    if peft:
        for name, module in base.named_modules():
            if not (hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")):
                continue
            if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
                continue  # already in the base weight, or switched off
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active:
                deltas[f"{name}.base_layer.weight"] = active
    with torch.no_grad():
        for name, param in base.named_parameters():
            if peft:
                if ".lora_" in name or ".original_module." in name:
                    continue
                if name in deltas:
                    module = base.get_submodule(name.rsplit(".base_layer.", 1)[0])
                    param = param + sum(module.get_delta_weight(a) for a in deltas[name]).to(param.dtype)
                name = name.replace(".base_layer.", ".")
                if ".modules_to_save." in name:
                    head, tail = name.split(".modules_to_save.", 1)
                    name = f"{head}.{tail.split('.', 1)[1]}"
            yield name, param.detach()
