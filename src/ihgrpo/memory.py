"""Start-up memory estimate: what one GPU must hold, said (and checked) before the first step.

Bytes per GPU, with N parameters (N_t of them trained: all, or LoRA's adapters), the weights'
dtype w (4 for `model.dtype: auto`, 2 for bfloat16) and the compute dtype c (2 under bf16):

    parameters   N   x w                      / processes, under FSDP
    gradients    N_t x w                      / processes, under FSDP
    optimizer    N_t x w x 2 (AdamW m and v)  / processes, under FSDP
    reference    N   x w                      / processes, under FSDP: the KL reference's frozen
                 copy (algo.kl_coef > 0 without LoRA; with LoRA it is the base, adapters off)
    generation   N   x c, the weights the rollout reads in the compute dtype: autocast's cached
                 bf16 casts of fp32 weights, or the gathered copy of sharded ones (FSDP); none when
                 the weights already are in c and whole, nor for LoRA's frozen base without FSDP
                 (autocast casts frozen weights per call, one at a time)
    KV cache     layers x 2 x kv_heads x head_dim x tokens x rows x c, with rows the trajectories
                 of one generate call (rollout.max_batch_rows, else the process's share of a
                 step: prompts_per_step / processes x group_size) and tokens the longest prompt +
                 rollout.max_response_tokens: every row at full length, which early RL reaches
    activations  approximate: one micro-batch of full-length sequences; with gradient
                 checkpointing the saved layer inputs plus one layer's recomputation, else every
                 layer's; plus the chunked output layer's buffers

Gradients are freed after every optimizer step, so the rollout holds parameters + optimizer +
reference + generation + KV cache and the update parameters + gradients + optimizer + reference +
activations; the estimate is the larger. The check refuses (ConfigError: `ihgrpo train` exits 2) when it exceeds
the free memory of the GPU the process sees, and names the settings that shrink each term.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ihgrpo.config import ConfigError
from ihgrpo.precision import Precision

__all__ = ["MemoryEstimate", "ModelShape", "count_parameters", "estimate_memory", "gpu_memory",
           "lora_parameter_count", "model_shape", "training_estimate"]

log = logging.getLogger(__name__)
GiB = 1024**3
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the size of the trained parameters


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def kv_values_per_token(self) -> int:
        """Numbers the KV cache holds per token of one row: layers x 2 (K and V) x kv_heads x head_dim."""
        return self.layers * 2 * self.kv_heads * self.head_dim


def model_shape(config) -> ModelShape:
    """The sizes the estimate needs, from a transformers config (decoder-only LMs: Qwen3, Llama...)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return ModelShape(layers=text.num_hidden_layers, hidden=text.hidden_size,
                      intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                      kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                      head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
                      vocab=text.vocab_size)


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no weights
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model_or_config) -> int:
    """Distinct parameters (tied ones once) of a model, or of the model a config describes."""
    model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    return sum(p.numel() for p in model.parameters())


def lora_parameter_count(model_or_config, r: int, target_modules=None) -> int:
    """Adapter parameters of LoRA rank r: r x (in + out) per targeted linear layer. target_modules
    None / "all-linear" (alone or in a list): every linear layer of the decoder blocks (not the
    output layer); else module names or glob patterns, matched against the last name part or the
    full name."""
    if r <= 0:
        return 0
    model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules or ["all-linear"])
    if "all-linear" in names:
        names = None
    total = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is out_layer:
            continue
        if names is not None and not any(fnmatch.fnmatch(name.rsplit(".", 1)[-1], pat) or fnmatch.fnmatch(name, pat)
                                         for pat in names):
            continue
        total += r * (mod.in_features + mod.out_features)
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (see the module docstring for each term) and the settings behind them."""

    parameters: int
    gradients: int
    optimizer: int
    generation: int
    kv_cache: int
    activations: int
    rows: int
    tokens: int
    processes: int = 1
    fsdp: bool = False
    lora: bool = False
    backend: str = "hf"  # "vllm": generation and KV cache are the vLLM engine's, in its own share
    reference: int = 0  # the KL reference's weights (a frozen copy), resident in both phases

    @property
    def rollout_phase(self) -> int:
        return self.parameters + self.optimizer + self.reference + self.generation + self.kv_cache

    @property
    def update_phase(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.reference + self.activations

    @property
    def total(self) -> int:
        return max(self.rollout_phase, self.update_phase)

    def summary(self) -> str:
        """A few lines for the log: every term in GiB and the two phases."""
        how = ("FSDP over %d processes" % self.processes if self.fsdp else "whole model on each GPU") + (
            ", LoRA" if self.lora else "") + (", rollout in vLLM's own share" if self.backend == "vllm" else "")
        g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
        return (f"memory per GPU (estimate; {how}): parameters {g(self.parameters)} GiB, gradients "
                f"{g(self.gradients)}, optimizer {g(self.optimizer)}, reference {g(self.reference)}, "
                f"generation weights {g(self.generation)}, "
                f"KV cache {g(self.kv_cache)} ({self.rows} rows x {self.tokens} tokens), activations ~"
                f"{g(self.activations)}\n  rollout {g(self.rollout_phase)} GiB, update {g(self.update_phase)} GiB"
                f" -> {g(self.total)} GiB")

    def check(self, free_bytes: int, device: str = "the GPU", update_headroom: int = 0) -> None:
        """Raise a one-line ConfigError when the estimate does not fit in `free_bytes` (the update
        phase may also use `update_headroom`: memory a sleeping vLLM engine gives back); warn when it
        leaves under 10% (allocator slack and the prefill's transients are not counted)."""
        if self.rollout_phase <= free_bytes and self.update_phase <= free_bytes + update_headroom:
            if max(self.rollout_phase, self.update_phase - update_headroom) > 0.9 * free_bytes:
                log.warning("the memory estimate (%.1f GiB) is within 10%% of %s's %.1f GiB free: the run "
                            "may still run out of memory", self.total / GiB, device, free_bytes / GiB)
            return
        fixes = []
        if not self.fsdp:
            fixes.append("distributed.strategy=fsdp on several GPUs (shards parameters, gradients and optimizer)")
        else:
            fixes.append(f"more GPUs (FSDP shards over {self.processes} now)")
        if not self.lora:
            fixes.append("LoRA (lora.r=16: trains adapters only)")
        if self.kv_cache >= self.total // 8 and self.rows > 1:
            fixes.append(f"rollout.max_batch_rows={max(1, self.rows // 4)} (now {self.rows} rows per generate call)")
        if self.activations >= self.total // 8:
            fixes.append("optim.micro_batch_size=1 and model.gradient_checkpointing=true")
        if self.reference >= self.total // 8:
            fixes.append("algo.kl_coef=0 (no reference copy)")
        if self.backend == "vllm":
            fixes.append("a smaller rollout.vllm_gpu_memory_utilization")
        raise ConfigError(
            f"the run needs about {self.total / GiB:.1f} GiB per GPU (parameters {self.parameters / GiB:.1f}, "
            f"gradients {self.gradients / GiB:.1f}, optimizer {self.optimizer / GiB:.1f}, reference "
            f"{self.reference / GiB:.1f}, generation weights "
            f"{self.generation / GiB:.1f}, KV cache {self.kv_cache / GiB:.1f}, activations ~{self.activations / GiB:.1f})"
            f" but {device} has {free_bytes / GiB:.1f} GiB free: use {'; or '.join(fixes)}"
            " (or check_memory=false to try anyway)")


def estimate_memory(shape: ModelShape, *, n_params: int, n_trainable: int, precision: Precision, rows: int,
                    tokens: int, micro_batch_size: int = 1, gradient_checkpointing: bool = False,
                    loss_chunk_size: int = 1024, processes: int = 1, fsdp: bool = False,
                    lora: bool = False, reference: bool = False) -> MemoryEstimate:
    """The estimate for one GPU (bytes); see the module docstring for each term. `reference`: the
    KL reference is a frozen copy of the model."""
    w = torch.finfo(precision.weights).bits // 8
    c = torch.finfo(precision.compute).bits // 8
    shard = processes if fsdp else 1
    generation = 0
    if fsdp or (precision.compute != precision.weights and not lora):
        generation = n_params * c
    # Activations of one micro-batch of full-length sequences: per layer the attention and MLP
    # inputs/outputs (about 6 x hidden + 3 x intermediate numbers per token, in c) and the layer's
    # input kept for the backward (in w: the residual stream stays in the weights' dtype).
    per_token_layer = (6 * shape.hidden + 3 * shape.intermediate) * c
    tok = micro_batch_size * tokens
    kept_layers = 1 if gradient_checkpointing else shape.layers
    activations = (tok * shape.layers * shape.hidden * w + tok * kept_layers * per_token_layer
                   + 2 * min(loss_chunk_size, tok) * shape.vocab * 4)
    return MemoryEstimate(
        parameters=n_params * w // shard, gradients=n_trainable * w // shard,
        optimizer=ADAMW_STATES * n_trainable * w // shard, generation=generation,
        kv_cache=shape.kv_values_per_token * tokens * rows * c, activations=activations,
        rows=rows, tokens=tokens, processes=processes, fsdp=fsdp, lora=lora,
        reference=n_params * w // shard if reference else 0)


def training_estimate(cfg, model: nn.Module, *, precision: Precision, processes: int,
                      prompt_tokens: int, backend: str = "hf") -> MemoryEstimate:
    """The estimate of a training run: `cfg` a TrainConfig, `model` the loaded (unsharded) model,
    `backend` the generation backend ("vllm": no generation copy or KV cache on the trainer's side).

    FSDP and LoRA are read from the config's `distributed.strategy` and `lora.r` /
    `lora.target_modules` when the config has those sections; adapters not yet added to the
    model are counted from lora.r."""
    r = cfg.rollout
    fsdp = getattr(getattr(cfg, "distributed", None), "strategy", "ddp") == "fsdp"
    lora_cfg = getattr(cfg, "lora", None)
    rank = int(getattr(lora_cfg, "r", 0) or 0)
    n_params = count_parameters(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank > 0 and n_trainable == n_params:  # adapters not added yet: count what they will be
        n_trainable = lora_parameter_count(model, rank, getattr(lora_cfg, "target_modules", None))
        n_params += n_trainable
    rows = max(1, cfg.prompts_per_step // processes) * r.group_size
    if r.max_batch_rows is not None:
        rows = min(rows, r.max_batch_rows)
    est = estimate_memory(
        model_shape(model.config), n_params=n_params, n_trainable=n_trainable, precision=precision, rows=rows,
        tokens=prompt_tokens + r.max_response_tokens, micro_batch_size=cfg.optim.micro_batch_size,
        gradient_checkpointing=cfg.model.gradient_checkpointing, loss_chunk_size=cfg.optim.loss_chunk_size,
        processes=processes, fsdp=fsdp, lora=rank > 0,
        reference=cfg.algo.kl_coef > 0 and rank == 0)  # the trainer's deep copy; with LoRA the base is it
    if backend == "vllm":
        est = dataclasses.replace(est, generation=0, kv_cache=0, backend="vllm")
    return est


def gpu_memory(device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device (torch.cuda.mem_get_info), None for any other device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)
