"""Data-parallel evaluation: one process per GPU, launched by ``torchrun`` or ``accelerate launch``.

The grid batches still missing are dealt out round-robin (the t-th to rank ``t % W``), so every
batch has the composition a 1-process run gives it and every sample keeps its seed: the samples are
those of the 1-process run (bit for bit on CPU). Rank r appends to its own shard
``samples.rank{r}.jsonl``; the main ``samples.jsonl`` is written by rank 0 only, which merges the
shards into it (in ledger order) after all ranks are done, and at start-up merges the shards that
a killed run left, so that a rerun with any number of processes resumes from everything finished.
Merging appends before it deletes the shards, and loading drops duplicates: a kill during the
merge loses nothing.

The processes coordinate over a gloo group (small objects; vLLM's engines build their own groups
on it), with a long timeout because ranks wait at the final barrier for the slowest one. A rank
that dies makes torchrun stop the others.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Any

from ihgrpo.utils import fsync_dir

from .ledger import SampleLedger

__all__ = ["EvalWorld", "shard_path", "merge_shards"]

_SHARD = re.compile(r"samples\.rank(\d+)\.jsonl")
# ranks that finished their share wait at the last barrier while others generate
_TIMEOUT = datetime.timedelta(days=7)


def shard_path(out: Path, rank: int) -> Path:
    return Path(out) / f"samples.rank{rank}.jsonl"


def merge_shards(ledger: SampleLedger, out: Path, order: dict[str, int]) -> int:
    """Appends the records of every shard in `out` that `ledger` lacks (ordered by benchmark as in
    `order`, then problem and sample), then deletes the shards. Returns how many were added."""
    shards = sorted(p for p in Path(out).iterdir() if _SHARD.fullmatch(p.name))
    new: dict[tuple, dict] = {}
    for path in shards:
        for key, rec in SampleLedger(path).load().records.items():
            if key not in ledger and key not in new:
                new[key] = rec
    ledger.append([new[k] for k in sorted(new, key=lambda k: (order.get(k[0], len(order)), k))])
    for path in shards:  # only once their records are durably in the main ledger
        path.unlink()
    if shards:
        fsync_dir(Path(out))
    return len(new)


class EvalWorld:
    """This process's place among the evaluation's processes (rank 0 of 1 without a launcher)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, owns_group: bool = False):
        self.rank, self.world, self.local_rank, self._owns_group = rank, world, local_rank, owns_group

    @classmethod
    def from_env(cls) -> EvalWorld:
        """From the variables torchrun and accelerate launch set (WORLD_SIZE, RANK, LOCAL_RANK)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("gloo", timeout=_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def share(self, items: list) -> list:
        """This rank's items: the t-th of `items` goes to rank t % W."""
        return items[self.rank::self.world]

    def device(self, device: str) -> str:
        """Where this rank runs: its own GPU (``cuda:{local_rank}``) when `device` is "cuda" and
        there are several processes; `device` itself otherwise."""
        if self.world == 1 or device != "cuda":
            return device
        import torch

        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list:
        """`obj` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False
