"""Multi-process data parallel training under ``torchrun`` (gloo on CPU, NCCL on CUDA).

``torchrun --nproc_per_node 2 -m prismrec train ...`` starts one process per rank with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :meth:`DistributedContext.from_env` joins the process group. Each
global batch of ``training.batch_size`` users is split between the ranks and the gradients are averaged,
so one step sees the same users as a single process would. Every rank evaluates (identically, the
parameters being identical), so early stopping needs no extra messages; only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> DistributedContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            owns = True
        return cls(rank, world, local_rank, owns)

    def device(self, configured: str) -> str:
        """With several CUDA processes each takes its own GPU."""
        if self.enabled and configured == "cuda":
            return f"cuda:{self.local_rank}"
        return configured

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (plain data, between our own processes)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def wrap_for_training(module: torch.nn.Module, context: DistributedContext) -> torch.nn.Module:
    if not context.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)
