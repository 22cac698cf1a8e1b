"""This process's place in the tensor-parallel group: its rank, the group's size, and the two process groups.

Activations travel over the device group (NCCL on GPUs, gloo on the CPU); step inputs and control messages are
pickled over a gloo group. A process outside any group (tensor_parallel_size 1) is rank 0 of 1, and every
collective in `communication` is then the identity, so model code calls them unconditionally.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

# Workers wait on the control group for rank 0's next step for as long as an engine idles; a dead peer still ends
# the wait at once (its socket closes).
CONTROL_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    world_size: int
    device_group: dist.ProcessGroup
    control_group: dist.ProcessGroup


_group: TensorParallelGroup | None = None


def check_outside_any_group() -> None:
    if _group is not None or dist.is_initialized():
        raise RuntimeError("this process already belongs to a process group; shut the running tensor-parallel "
                           "engine down (llm.shutdown()) before starting another")


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str) -> TensorParallelGroup:
    """Join the group (every rank calls this with the same init_method: tcp://host:port, or env:// under torchrun)."""
    global _group
    check_outside_any_group()
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _group = TensorParallelGroup(rank, world_size, dist.group.WORLD, control_group)
    return _group


def destroy_tensor_parallel() -> None:
    global _group
    if _group is not None:
        _group = None
        dist.destroy_process_group()


def get_tensor_parallel_group() -> TensorParallelGroup | None:
    return _group


def get_tensor_parallel_rank() -> int:
    return 0 if _group is None else _group.rank


def get_tensor_parallel_world_size() -> int:
    return 1 if _group is None else _group.world_size
