"""Triton fused mixture of experts: every token's top-k experts in two grouped GEMMs, no per-expert launches.

The (token, slot) pairs are sorted by expert and each expert's run is padded to a multiple of BLOCK_M rows
(`align_pairs`, in torch with fixed shapes: no host sync, so a CUDA graph can hold it). A program then owns BLOCK_M
rows of one expert x BLOCK_N columns and multiplies them by that expert's weight: first x @ w13[e]^T (gate and
up), then, after SiLU-and-mul, @ w2[e]^T scaled by the routing weight. The k slots of a token are summed last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_utils import dot_precision


@triton.jit
def _expert_gemm_kernel(
    a, b, c, sorted_pairs, block_experts, topk_weights,
    num_pairs, N, K,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm,
    A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (row block, column block): rows are (token, slot) pairs of one expert; row r of `a` is pair // A_ROW_DIV
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    pairs = tl.load(sorted_pairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    if tl.max(valid.to(tl.int32), 0) == 0:     # a padding block past the last expert's rows
        return
    expert = tl.load(block_experts + pid_m).to(tl.int64)
    rows = (pairs // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        x = tl.load(a + rows[:, None] * stride_am + (k0 + offs_k)[None, :], mask=valid[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(b + expert * stride_be + offs_n[None, :] * stride_bn + (k0 + offs_k)[:, None] * stride_bk,
                    mask=k_mask[:, None] & (offs_n < N)[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if MUL_WEIGHT:
        acc *= tl.load(topk_weights + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(c + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], acc.to(c.dtype.element_ty),
             mask=valid[:, None] & (offs_n < N)[None, :])


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs, block_experts): pair ids (t * k + j) grouped by expert, each group padded with the sentinel
    T * k to a multiple of block_m, and the expert of each block of block_m rows. Shapes depend on T, k and E only."""
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    max_rows = (triton.cdiv(num_pairs, block_m) + num_experts) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order].long()
    rank = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    sorted_pairs = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[(padded_end - padded)[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=flat.device)
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pairs, block_experts.to(torch.int32)


def moe_config(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def _expert_gemm(a, b, out, sorted_pairs, block_experts, topk_weights, num_pairs, a_row_div, mul_weight, config):
    n, k = b.shape[1], b.shape[2]
    grid = (sorted_pairs.numel() // config["BLOCK_M"], triton.cdiv(n, config["BLOCK_N"]))
    _expert_gemm_kernel[grid](
        a, b, out, sorted_pairs, block_experts, topk_weights, num_pairs, n, k,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=mul_weight, DOT_PRECISION=dot_precision(a.dtype), **config)


def fused_moe(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(x)
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1
    config = moe_config(x.device)
    sorted_pairs, block_experts = align_pairs(topk_ids, w13.shape[0], config["BLOCK_M"])
    weights = topk_weights.contiguous().float()
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    _expert_gemm(x, w13, gate_up, sorted_pairs, block_experts, weights, num_pairs, top_k, False, config)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = (F.silu(gate) * up).contiguous()
    out = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _expert_gemm(hidden, w2, out, sorted_pairs, block_experts, weights, num_pairs, 1, True, config)
    return out.view(num_tokens, top_k, -1).sum(dim=1)
