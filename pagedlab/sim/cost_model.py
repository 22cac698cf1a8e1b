"""How long a step would take on a GPU, from what the batch must compute and read: the generic roofline model.

    step_time = overhead + max(compute, memory)
    compute   = (2 * params * batched_tokens + attention_flops) / flops
    memory    = (weight_bytes + kv_bytes_read + kv_bytes_written) / bandwidth
    swaps     = blocks moved * block bytes / pcie_bandwidth   (added by the simulator)

A decode step of a small batch is bound by reading the weights and the KV cache; a long prefill by matmul
throughput. Defaults describe a lent H100 as measured here (3.0 TB/s copy, ~790 TFLOP/s bf16 matmul) derated
to what a real engine sustains (`efficiency`); every parameter can be set. Its times are estimates: a cost
model built from a GPU profile (`sim/profiled_cost.py`, `pagedlab profile`) measures them instead.

Every cost model answers the simulator's two questions: `batch_time(out, block_size)` (any scheduled step, block moves
included) and `decode_time(num_seqs, context, max_context)` (a decode-only step; `context` = the sum of the
sequences' lengths after it, `max_context` the longest), and says where its numbers come from (`source`, `describe()`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes


MODEL_SHAPES = {
    "llama-3-8b": ModelShape("llama-3-8b", 8.03e9, 32, 4096, 8, 128),
    "llama-3.2-1b": ModelShape("llama-3.2-1b", 1.24e9, 16, 2048, 8, 64),
    "llama-2-13b": ModelShape("llama-2-13b", 13.0e9, 40, 5120, 40, 128),
    "opt-13b": ModelShape("opt-13b", 12.9e9, 40, 5120, 40, 128),
    "opt-125m": ModelShape("opt-125m", 0.125e9, 12, 768, 12, 64),
}


@dataclass(frozen=True)
class CostModel:
    model: ModelShape = MODEL_SHAPES["llama-3-8b"]
    flops: float = 790e12          # dense bf16 matmul, FLOP/s
    bandwidth: float = 3.0e12      # device memory, bytes/s (read + write)
    efficiency: float = 0.6        # fraction of both peaks a real engine sustains
    overhead: float = 2e-3         # per-step launch and scheduling cost, seconds
    pcie_bandwidth: float = 25e9   # host <-> device, bytes/s: what a swap costs

    source = "roofline"

    def describe(self) -> str:
        return (f"generic roofline model ({self.model.name}: {self.flops / 1e12:.0f} TFLOP/s, "
                f"{self.bandwidth / 1e12:.1f} TB/s x {self.efficiency} + {self.overhead * 1e3:g} ms a step): "
                "estimated times; give a GPU profile (pagedlab profile) for measured ones")

    def batch_time(self, out, block_size: int) -> float:
        chunks, starts = out.num_scheduled_tokens, out.num_computed_tokens
        tokens = sum(chunks)
        context = sum(starts) + tokens
        pairs = sum(map(operator.mul, chunks, starts)) + sum(map(operator.mul, chunks, chunks))  # sum n * (start + n)
        swapped = len(out.blocks_to_swap_out) + len(out.blocks_to_swap_in)
        block_bytes = self.model.kv_bytes_per_token * block_size
        return self.step_time(tokens, context, pairs) + swapped * block_bytes / self.pcie_bandwidth

    def decode_time(self, num_seqs: int, context: int, max_context: int | None = None) -> float:
        return self.step_time(num_seqs, context, context)

    def step_time(self, batched_tokens: int, context_tokens_read: int, attention_pairs: int) -> float:
        """`context_tokens_read`: KV entries read this step (each sequence's context once);
        `attention_pairs`: query-key pairs scored (for prefill, ~ chunk * context)."""
        if batched_tokens == 0:
            return 0.0
        m = self.model
        attention_flops = 4 * attention_pairs * m.num_layers * m.hidden_size
        compute = (2 * m.num_params * batched_tokens + attention_flops) / (self.flops * self.efficiency)
        moved = m.weight_bytes + (context_tokens_read + batched_tokens) * m.kv_bytes_per_token
        memory = moved / (self.bandwidth * self.efficiency)
        return self.overhead + max(compute, memory)
