"""Collectives of the tensor-parallel group. Outside a group (one rank) each is the identity."""
from __future__ import annotations

from typing import Any, NamedTuple

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


class _CudaTensor(NamedTuple):
    dtype: torch.dtype
    shape: torch.Size


def broadcast_tensor_dict(data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank 0's dict on every rank. CUDA tensors travel over the device group (NCCL, device to device); the rest,
    CPU tensors included, is pickled in one message over the control group."""
    group = get_tensor_parallel_group()
    if group.rank == 0:
        # a CPU tensor is cloned: pickling a view would send its whole storage
        header = broadcast_object({key: _CudaTensor(value.dtype, value.shape) if _is_cuda(value) else
                                   value.clone() if torch.is_tensor(value) else value for key, value in data.items()})
    else:
        header = broadcast_object()
        data = {key: torch.empty(spec.shape, dtype=spec.dtype, device="cuda") if isinstance(spec, _CudaTensor)
                else spec for key, spec in header.items()}
    handles = [dist.broadcast(data[key].contiguous() if group.rank == 0 else data[key], src=0,
                              group=group.device_group, async_op=True)
               for key, spec in header.items() if isinstance(spec, _CudaTensor) and spec.shape.numel()]
    for handle in handles:
        handle.wait()
    return data


def _is_cuda(value: Any) -> bool:
    return torch.is_tensor(value) and value.is_cuda
