"""Data-parallel training across processes (`torchrun --nproc_per_node=N`), a no-op on one process.

Initialised from torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) when
WORLD_SIZE > 1; gloo on CPU. Every rank draws its own random numbers (seed + rank); only rank 0 logs and
writes checkpoints.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by the environment; idempotent; single process without WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistInfo()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wrap_model(model: nn.Module, info: DistInfo, find_unused_parameters: bool = True) -> nn.Module:
    """DistributedDataParallel around `model` (broadcasts rank 0's weights); the model itself on one process.
    Unused parameters are expected: heads can be switched off and `adapt` freezes most of the model."""
    if not info.enabled:
        return model
    device_ids = [info.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean over ranks of each value; every rank must call it with the same keys in the same order."""
    if not info.enabled or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / info.world_size for k, v in zip(values, t.tolist(), strict=True)}


def gather_objects(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (None elsewhere); every rank must call it."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
