"""The paged decode kernel's speed per block size: timed now on an NVIDIA GPU, or, without one, the sweep that
benchmarks/bench_kernels.py recorded (benchmarks/results/block_size_sweep.csv, its card in kernels.json)."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SWEEP_CSV, SWEEP_JSON = RESULTS / "block_size_sweep.csv", RESULTS / "kernels.json"


def kernel_block_size_sweep(block_sizes: list[int]) -> tuple[pd.DataFrame, str]:
    """(rows of block_size and time_us, the card they come from: "NVIDIA H200 (measured now)" or
    "NVIDIA H100 80GB HBM3 (recorded)")."""
    import torch

    if torch.cuda.is_available():
        return decode_times_by_block_size(block_sizes), f"{torch.cuda.get_device_name()} (measured now)"
    sweep = pd.read_csv(SWEEP_CSV)
    card = json.loads(SWEEP_JSON.read_text())["gpu"]
    return sweep[sweep["block_size"].isin(block_sizes)].reset_index(drop=True), f"{card} (recorded)"


def decode_times_by_block_size(block_sizes: list[int], batch: int = 64, context: int = 2048, num_heads: int = 32,
                               num_kv_heads: int = 8, head_dim: int = 128) -> pd.DataFrame:
    """One decode step of `batch` sequences of `context` tokens (Llama-3-8B's heads, bf16), blocks scattered at
    random over the cache as in a busy engine: the median kernel time per block size."""
    import torch

    from pagedlab import kernels

    rows = []
    for block_size in block_sizes:
        blocks_per_seq = -(-context // block_size)
        num_blocks = batch * blocks_per_seq
        k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        block_tables = torch.randperm(num_blocks, device="cuda").int().view(batch, blocks_per_seq)
        query = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        decode = partial(kernels.paged_decode_attention, query, k_cache, v_cache, block_tables, seq_lens,
                         head_dim ** -0.5)
        rows.append({"block_size": block_size, "time_us": _median_us(decode)})
    return pd.DataFrame(rows)


def _median_us(fn) -> float:
    """Triton's do_bench, as benchmarks/bench_kernels.py times it, so the numbers compare with its sweep."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
