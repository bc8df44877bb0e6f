"""How the policy is spread over processes: a strategy owns the wrapping, the gradient averaging,
the full-parameter context for rollouts, and the full state dicts that checkpoints hold.

* ``ddp``: every process holds the whole model (accelerate's DDP wrapper). Gradients are
  accumulated locally and averaged by hand once per optimizer step, because dynamic sampling
  can leave ranks with different numbers of micro-batches.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``): each decoder block is one unit and
  the rest (embeddings, final norm, output layer) belongs to the root, the policy wrapper. Weights,
  gradients and optimizer state are sharded, so a process holds 1/N of them. Gradients are
  reduce-scattered (averaged) inside every backward, so every rank must run the same number of
  forward/backward passes: :meth:`Strategy.passes` says how many, and the trainer runs zero-weight
  passes on a rank that has fewer micro-batches.

FSDP is applied here with torch's ``fully_shard`` (the call accelerate's FSDP2 plugin makes),
not through ``Accelerator(fsdp_plugin=...)``: accelerate 1.16 enables FSDP only for GPU-like
devices (a CPU/gloo run stays ``MULTI_CPU`` and ignores the plugin), so the plugin path could
never be tested on CPU; this one runs the same code on CPU/gloo and GPU/NCCL. accelerate still
launches the processes, sets the device and the precision.

Generation does not all-gather per decode step: :meth:`Strategy.full_params` gathers every unit
once for the whole rollout phase (in the compute dtype under bf16 mixed precision) and frees the
gathered copies afterwards.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from ihgrpo.config import ConfigError, DistributedSection

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["Strategy", "DDPStrategy", "FSDPStrategy", "make_strategy"]


def make_strategy(section: DistributedSection, accelerator: Accelerator) -> Strategy:
    if getattr(accelerator.distributed_type, "name", "") in ("FSDP", "DEEPSPEED"):
        # accelerate would then own the wrapping (and refuse an optimizer prepared without its model)
        raise ConfigError(f"the accelerate config asks for {accelerator.distributed_type.name}; launch with "
                          "distributed_type: MULTI_GPU (configs/accelerate/) and set distributed.strategy=fsdp")
    return (FSDPStrategy if section.strategy == "fsdp" else DDPStrategy)(section, accelerator)


class Strategy:
    """DDP-like defaults; :class:`FSDPStrategy` overrides what sharding changes."""

    lockstep = False  # True: every forward/backward is a collective (ranks must run the same passes)

    def __init__(self, section: DistributedSection, accelerator: Accelerator):
        self.section = section
        self.accelerator = accelerator
        self.world = accelerator.num_processes

    # ------------------------------------------------------------------ wrapping
    def wrap(self, policy: nn.Module) -> nn.Module:
        policy = self.accelerator.prepare(policy)
        if isinstance(policy, nn.parallel.DistributedDataParallel):
            # No buffer broadcast in DDP's forward (its first one, under no_sync): a collective that a
            # rank without micro-batches (dynamic sampling kept no group there) never joins, a hang.
            # The buffers (RoPE frequencies) are equal on all ranks, synced once at wrapping.
            policy.broadcast_buffers = False
        return policy

    def unwrap(self, policy: nn.Module) -> nn.Module:
        """The policy module itself (PolicyStats), without DDP's wrapper."""
        return self.accelerator.unwrap_model(policy)

    def prepare_reference(self, reference: nn.Module) -> nn.Module:
        """A frozen copy of the policy (the KL reference), placed like the policy."""
        return reference.to(self.accelerator.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------ the update
    def passes(self, n_local: int) -> int:
        """Forward/backward passes this rank runs for `n_local` micro-batches."""
        return n_local

    def no_sync(self, policy: nn.Module):
        return self.accelerator.no_sync(policy)

    @torch.no_grad()
    def sync_gradients(self, policy: nn.Module) -> None:
        """The mean of every rank's gradient (ranks without a micro-batch contribute zeros)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in policy.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world

    def clip_grad_norm(self, policy: nn.Module, max_norm: float) -> float:
        """The gradient's global norm before clipping (`max_norm` 0: no clipping)."""
        if max_norm > 0:
            return float(self.accelerator.clip_grad_norm_(policy.parameters(), max_norm))
        return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in policy.parameters()
                                    if p.grad is not None)))

    # ------------------------------------------------------------------ rollouts
    def full_params(self, policy: nn.Module):  # noqa: ARG002 - every process holds them already
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ checkpoints
    def model_state_dict(self, policy: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The full state dict of the language model (the names `save_pretrained` writes), on
        the main process; other processes may get an empty dict."""
        model = self.unwrap(policy).model
        if not trainable_only:
            return model.state_dict()
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in model.state_dict().items() if k in keep}

    def load_model_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Loads (a part of) the model's weights; returns (missing, unexpected) names."""
        missing, unexpected = self.unwrap(policy).model.load_state_dict(state, strict=False)
        return list(missing), list(unexpected)

    def optimizer_state_dict(self, policy: nn.Module, optimizer) -> dict:  # noqa: ARG002
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, policy: nn.Module, optimizer, state: dict) -> None:  # noqa: ARG002
        optimizer.load_state_dict(state)


DDPStrategy = Strategy


def _ensure_process_group(device: torch.device) -> None:
    """FSDP's collectives need a process group; a plain `python` run (one process, e.g. for
    cpu_offload on one GPU) has none, so start a 1-process one (an in-memory store, no port)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class FSDPStrategy(Strategy):
    def __init__(self, section: DistributedSection, accelerator: Accelerator):
        super().__init__(section, accelerator)
        self._units: list[tuple[nn.Module, bool]] = []  # (FSDP unit, its reshard_after_forward)

    @property
    def lockstep(self) -> bool:
        return bool(self._units)

    # ------------------------------------------------------------------ wrapping
    def _shard(self, policy: nn.Module) -> list[tuple[nn.Module, bool]]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        s = self.section
        # Pinned host memory (faster copies to the GPU) needs an accelerator: a CPU run offloads unpinned.
        pin = self.accelerator.device.type != "cpu"
        kw = {"offload_policy": CPUOffloadPolicy(pin_memory=pin) if s.cpu_offload else OffloadPolicy()}
        if s.mixed_precision and self.accelerator.mixed_precision == "bf16":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        block = _block_class(policy.model, s.wrap_class)
        self._broadcast_from_rank0(policy)
        units = []
        for module in policy.model.modules():
            if isinstance(module, block):
                fully_shard(module, reshard_after_forward=s.reshard_after_forward, **kw)
                units.append((module, s.reshard_after_forward))
        # The root keeps its weights (embeddings, norm, output layer) gathered between forward
        # and backward: the backward needs them first.
        fully_shard(policy, reshard_after_forward=False, **kw)
        # Fix the root now: a rollout calls the blocks without going through the root's forward,
        # and FSDP would otherwise make the first block it sees the root.
        policy._get_fsdp_state()._lazy_init()
        return [(policy, False), *units]

    @torch.no_grad()
    def _broadcast_from_rank0(self, module: nn.Module) -> None:
        """Rank 0's weights everywhere: each rank keeps its slice of its *own* copy, so copies
        that differ (LoRA's random init, seeded per rank) would mix into a model no rank had.
        DDP does the same at wrap time. One tensor at a time through the device (NCCL)."""
        import torch.distributed as dist

        device = self.accelerator.device
        for t in [*module.parameters(), *module.buffers()]:
            buf = t.data.to(device)
            dist.broadcast(buf, src=0)
            if buf is not t.data:
                t.data.copy_(buf)

    def wrap(self, policy: nn.Module) -> nn.Module:
        if self.world == 1 and not self.section.cpu_offload:
            # One process: nothing to shard, and FSDP would only add copies.
            return super().wrap(policy)
        _ensure_process_group(self.accelerator.device)
        self._units = self._shard(policy)
        return policy

    def unwrap(self, policy: nn.Module) -> nn.Module:
        return policy if self._units else super().unwrap(policy)

    def prepare_reference(self, reference: nn.Module) -> nn.Module:
        reference.requires_grad_(False).eval()
        if not self._units:
            return super().prepare_reference(reference)
        self._shard(reference)
        return reference

    # ------------------------------------------------------------------ the update
    def passes(self, n_local: int) -> int:
        if not self._units:
            return n_local
        import torch.distributed as dist

        t = torch.tensor([n_local], dtype=torch.long, device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def no_sync(self, policy: nn.Module):
        if not self._units:
            return super().no_sync(policy)
        # Reduce-scatter in every backward: accumulating unsharded gradients would need a full
        # gradient per rank, the memory FSDP is there to save.
        return contextlib.nullcontext()

    def sync_gradients(self, policy: nn.Module) -> None:
        if not self._units:
            super().sync_gradients(policy)

    @torch.no_grad()
    def clip_grad_norm(self, policy: nn.Module, max_norm: float) -> float:
        if not self._units:
            return super().clip_grad_norm(policy, max_norm)
        import torch.distributed as dist

        grads = [_local(p.grad) for p in policy.parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        for g in grads:
            sq += g.double().pow(2).sum().to(sq.device)
        dist.all_reduce(sq)  # each rank holds a disjoint shard of every gradient
        norm = float(sq.sqrt())
        if max_norm > 0:
            coef = min(1.0, max_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return norm

    # ------------------------------------------------------------------ rollouts
    @contextlib.contextmanager
    def full_params(self, policy: nn.Module):
        """Every unit gathered once, kept through all decode steps, freed on exit. A collective:
        every rank enters it."""
        for unit, _ in self._units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit, reshard in self._units:
                unit.set_reshard_after_forward(reshard, recurse=False)
                unit.reshard()

    # ------------------------------------------------------------------ checkpoints
    def model_state_dict(self, policy: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        if not self._units:
            return super().model_state_dict(policy, trainable_only=trainable_only)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # A collective: every rank gathers, the main process keeps CPU copies.
        full = get_model_state_dict(policy, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
        return {k.removeprefix("model."): v for k, v in full.items()}

    def load_model_state_dict(self, policy: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        if not self._units:
            return super().load_model_state_dict(policy, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # The main process reads the checkpoint and broadcasts; the others pass an empty dict.
        state = {f"model.{k}": v for k, v in state.items()} if self.accelerator.is_main_process else {}
        res = set_model_state_dict(policy, state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
        return ([k.removeprefix("model.") for k in res.missing_keys],
                [k.removeprefix("model.") for k in res.unexpected_keys])

    def optimizer_state_dict(self, policy: nn.Module, optimizer) -> dict:
        if not self._units:
            return super().optimizer_state_dict(policy, optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(policy, _inner(optimizer), options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, policy: nn.Module, optimizer, state: dict) -> None:
        if not self._units:
            return super().load_optimizer_state_dict(policy, optimizer, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(policy, _inner(optimizer), state if self.accelerator.is_main_process else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _block_class(model: nn.Module, name: str | None) -> type:
    """The decoder block class: `distributed.wrap_class`, else the model's `_no_split_modules`."""
    names = [name] if name else list(getattr(model, "_no_split_modules", None) or [])
    for n in names:
        for m in model.modules():
            if type(m).__name__ == n:
                return type(m)
    if name:
        raise ConfigError(f"distributed.wrap_class: no module of class {name!r} in the model")
    raise ConfigError("distributed.wrap_class: the model names no block class (_no_split_modules); "
                      "set it to the decoder layer's class name, e.g. Qwen3DecoderLayer")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
