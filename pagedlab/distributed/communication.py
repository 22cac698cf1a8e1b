"""Collectives of the tensor-parallel group. Outside a group (one rank) each is the identity."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pagedlab.distributed.parallel_state import get_tensor_parallel_group


def tensor_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place."""
    group = get_tensor_parallel_group()
    if group is not None:
        dist.all_reduce(x, group=group.device_group)
    return x


def gather_to_first_rank(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Every rank's x concatenated along dim on rank 0; None on the other ranks."""
    group = get_tensor_parallel_group()
    if group is None:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.world_size)] if group.rank == 0 else None
    dist.gather(x, parts, dst=0, group=group.device_group)
    return torch.cat(parts, dim) if group.rank == 0 else None


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's obj on every rank, pickled over the control group."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=get_tensor_parallel_group().control_group)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order, on every rank."""
    group = get_tensor_parallel_group()
    gathered = [None] * group.world_size
    dist.all_gather_object(gathered, obj, group=group.control_group)
    return gathered
