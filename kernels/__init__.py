"""Paged KV-cache kernels: cache writes, paged attention (decode and prefill), block copy and swap; the fused
mixture-of-experts GEMMs; and the quantized layers' kernels: the AWQ GEMM and fp8 quantization of activations.

KV cache layout (a contract the model runner relies on)
-------------------------------------------------------
Per layer two tensors, k_cache and v_cache, each contiguous [num_blocks, block_size, num_kv_heads, head_dim].
The token at logical position p of a sequence lives in physical block block_table[p // block_size] at offset
p % block_size; its slot is block * block_size + offset, and cache.view(-1, num_kv_heads, head_dim)[slot]
is its [num_kv_heads, head_dim] entry.

Why this order: one token's heads x dims are contiguous, so writing a new token is one coalesced store and
attention reads each token's head_dim vector with wide vectorized loads. The block is the leading dimension,
so a block is one contiguous chunk in every layer: the unit the block manager allocates, copies
(copy-on-write) and swaps to CPU memory with a single memcpy.

Dispatch
--------
Each function runs a Triton kernel when use_triton(tensor) says so (tensors on CUDA, or TRITON_INTERPRET=1,
which runs the kernels on the CPU in Triton's interpreter and must be set before triton is imported) and
otherwise the pure-torch reference of the same name in reference.py (`<name>_ref`), so the engine runs on a
machine with no GPU and no Triton.

fp8: caches of dtype torch.float8_e4m3fn store x / scale (saturated to +-448) and are read as fp8 x scale.
Scales are Python floats or 1-element float32 tensors (None means 1.0).
"""
from __future__ import annotations

import os

import torch

from .reference import (awq_gemm_ref, copy_blocks_ref, fused_moe_ref, paged_decode_attention_ref,
                        paged_prefill_attention_ref, quantize_rows_fp8_ref, swap_blocks_ref, write_kv_cache_ref)

try:
    from . import attention, awq, cache_ops, moe, quant
except ImportError:  # no Triton: a CPU-only install, served by the references
    attention = awq = cache_ops = moe = quant = None

__all__ = ["use_triton", "write_kv_cache", "paged_decode_attention", "paged_prefill_attention", "copy_blocks",
           "swap_blocks", "awq_gemm", "quantize_rows_fp8", "fused_moe"]


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether tensor's kernels run in Triton: on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    if attention is None:
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Store key/value [T, Hkv, D] of T tokens at their slots (int64 [T]); a negative slot skips the token."""
    impl = cache_ops.write_kv_cache if use_triton(key) else write_kv_cache_ref
    impl(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale,
                           k_scale=None, v_scale=None, num_splits=None, out=None, sliding_window=None,
                           softcap=None) -> torch.Tensor:
    """Attention of one new token per sequence over its whole context, read through the block table.

    query [B, Hq, D] (Hq a multiple of Hkv); block_tables int32 [B, max_blocks]; seq_lens int32 [B] counts the
    context including the new token, whose K/V is already in the cache. Returns [B, Hq, D] in query's dtype.
    num_splits: how many ranges each context is split into (split-KV); None chooses from the batch size,
    the number of SMs and block_tables' width. out: an optional preallocated output (a CUDA-graph buffer, say).
    A sequence with seq_len 0 (batch padding) gets zeros.
    sliding_window: the query sees only its last sliding_window keys (itself included), and no key before them is
    read. softcap: scores become softcap * tanh(scores / softcap) before the softmax (Gemma 2).
    """
    impl = attention.paged_decode_attention if use_triton(query) else paged_decode_attention_ref
    return impl(query, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale, num_splits, out,
                sliding_window, softcap)


def paged_prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                            max_query_len, k_scale=None, v_scale=None, out=None, sliding_window=None,
                            softcap=None) -> torch.Tensor:
    """Causal attention of the new tokens of B sequences, packed in query [T, Hq, D].

    Sequence b's new tokens are query[query_start_loc[b]:query_start_loc[b + 1]] (int32 [B + 1]); seq_lens
    [B] counts its whole context, so new token i sits at position seq_lens[b] - q_len_b + i and attends to
    every position up to its own: the cached prefix (chunked prefill, prefix caching) and the new tokens
    before it. Their K/V is already in the cache. A decode token is q_len 1, so mixed batches work too.
    max_query_len is the largest q_len (a host int: it sizes the launch grid). out: optional preallocated
    output; rows of tokens past query_start_loc[-1] are left as they are. sliding_window and softcap as for
    decode: each new token sees its last sliding_window keys.
    """
    impl = attention.paged_prefill_attention if use_triton(query) else paged_prefill_attention_ref
    return impl(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len,
                k_scale, v_scale, out, sliding_window, softcap)


def copy_blocks(k_caches, v_caches, block_mapping) -> None:
    """Copy-on-write in every layer: block dst := block src for each row (src, dst) of block_mapping
    (int64 [N, 2], on the caches' device). Destinations must be distinct and not also sources."""
    impl = cache_ops.copy_blocks if use_triton(k_caches[0]) else copy_blocks_ref
    impl(k_caches, v_caches, block_mapping)


# A block is one contiguous chunk on both sides, so a per-block copy is already one DMA: no kernel needed.
swap_blocks = swap_blocks_ref


def awq_gemm(x, qweight, scales, qzeros, group_size: int, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] @ W [K, N] for W in AutoAWQ's 4-bit GEMM format (see reference.awq_dequantize_ref): qweight
    int32 [K, N / 8], qzeros int32 [K / G, N / 8], scales [K / G, N] in x's dtype. Returns [M, N] in x's dtype.
    split_k: how many programs share each output tile's K range; None chooses from M, N and the number of SMs."""
    if use_triton(x):
        return awq.awq_gemm(x, qweight, scales, qzeros, group_size, split_k)
    return awq_gemm_ref(x, qweight, scales, qzeros, group_size)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (float8_e4m3fn [R, C], float32 scales [R, 1]): each row scaled so its max |x| is 448
    (x ~ fp8 * scale), saturated, rounded to nearest even. The activations' side of the fp8 GEMM."""
    return (quant.quantize_rows_fp8 if use_triton(x) else quantize_rows_fp8_ref)(x)


def fused_moe(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Mixture of experts: out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(g) * u) with [g; u] = w13[e] @ x[t],
    e = topk_ids[t, j]. x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights [T, k]
    (float32 or x's dtype), topk_ids int [T, k]. Returns [T, H] in x's dtype."""
    impl = moe.fused_moe if use_triton(x) else fused_moe_ref
    return impl(x, w13, w2, topk_weights, topk_ids)
