"""The executor side of the seam: what an executor is, and the KV-cache size check every executor's cache meets.

An executor is the model runner (real forward passes on the paged KV cache) or the simulator (a cost model).
Both take the same plain-data `SchedulerOutput` (pagedlab/sched_output.py) and return `SampleResult`s, so the
scheduler and memory manager never know which one runs, and the executor never sees a scheduler object.
"""
from __future__ import annotations

from typing import Callable, Protocol

from pagedlab.config import ConfigError
from pagedlab.sched_output import SampleResult, SchedulerOutput

__all__ = ["Executor", "SampleResult", "SchedulerOutput", "check_kv_capacity", "format_bytes"]


class Executor(Protocol):
    def execute(self, out: SchedulerOutput, grammar: Callable[[int], object] | None = None
                ) -> list[SampleResult | None]:
        """One result per scheduled sequence, aligned with out.seq_ids; None where the sequence does not sample
        (nor has prompt logprobs) this step. grammar(vocab_size): the structured-output bitmask of the sampling
        rows (a layers.logits_processors.GrammarBitmask), asked for once the forward pass runs."""


def format_bytes(num_bytes: float) -> str:
    """In the largest binary unit that keeps the number at 1 or more: 3.25 GiB, 2.0 MiB, 512 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.3g} {unit}"
    return f"{num_bytes:.0f} B"


def check_kv_capacity(num_blocks: int, block_size: int, max_model_len: int, bytes_per_block: int | None = None
                      ) -> None:
    """One request of max_model_len tokens must fit, or no request of that length could ever run."""
    capacity = num_blocks * block_size
    if capacity >= max_model_len:
        return
    gib = "" if bytes_per_block is None else (
        f" ({format_bytes(-(-max_model_len // block_size) * bytes_per_block)} of KV cache needed, "
        f"{format_bytes(num_blocks * bytes_per_block)} available)")
    raise ConfigError(
        f"The model's max seq len ({max_model_len}) is larger than the maximum number of tokens that can be stored "
        f"in KV cache ({capacity}){gib}. Based on the available memory, the estimated maximum model length is "
        f"{capacity}. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing "
        "the engine.")
