"""Triton AWQ GEMM: x [M, K] @ W [K, N] with W in AutoAWQ's 4-bit GEMM format, dequantized tile by tile.

Each program computes a [BLOCK_M, BLOCK_N] output tile over its share of K. Per K tile it loads the packed
int32 weights [BLOCK_K, BLOCK_N / 8], expands every int32 to its 8 columns in registers (interleave), shifts
each column's nibble out (AWQ's interleaved order), subtracts the group's zero points, multiplies by the group's
scales and feeds the fp16/fp32 tile to tl.dot, accumulating in fp32. The weights cross memory once, in 4 bits:
at decode batch sizes the GEMM is bound by reading them, so that is the 4x over fp16 that matters.

BLOCK_K divides the group size, so a K tile lies inside one quantization group: one row of scales and zeros
per tile. When M x N gives too few tiles to fill the GPU (decode), K is split across programs that write fp32
partial sums, added afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import AWQ_PACK_FACTOR
from .triton_utils import dot_precision, num_sms

DOT_MIN = 16  # tl.dot needs at least 16 rows, columns and depth


@triton.jit
def _unpack(packed, shifts):
    """int32 [R, C / 8] -> [R, C]: each int32 repeated for its 8 columns, then each column's nibble."""
    expanded = tl.interleave(packed, packed)
    expanded = tl.interleave(expanded, expanded)
    expanded = tl.interleave(expanded, expanded)
    return (expanded >> shifts) & 0xF


@triton.jit
def _awq_gemm_kernel(
    x, qweight, scales, qzeros, out, M, N, K, split_k,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_os, stride_om,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_packed = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask, packed_mask = offs_m < M, offs_n < N, offs_packed < N // 8
    column = tl.arange(0, BLOCK_N) % 8
    shifts = (column // 2 + 4 * (column % 2)) * 4        # column j of 8 sits at nibble j // 2 + 4 * (j % 2)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(split * BLOCK_K, K, split_k * BLOCK_K):    # a run-time split count: one compile for all
        k = k_start + offs_k
        a = tl.load(x + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None], other=0.0)
        packed = tl.load(qweight + k[:, None] * stride_qk + offs_packed[None, :], mask=packed_mask[None, :], other=0)
        group = k_start // GROUP_SIZE
        packed_zeros = tl.load(qzeros + group * stride_zg + offs_packed, mask=packed_mask, other=0)
        scale = tl.load(scales + group * stride_sg + offs_n, mask=n_mask, other=0.0)
        zeros = _unpack(packed_zeros[None, :], shifts[None, :])
        w = (_unpack(packed, shifts[None, :]) - zeros).to(scale.dtype) * scale[None, :]
        acc += tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION)

    out_ptrs = out + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemm_config(M: int, group_size: int, device: torch.device) -> dict:
    """Tile sizes: small M (decode) takes narrow tiles; large M takes wider ones that reuse each dequantized
    weight tile across more rows."""
    if device.type != "cuda":   # the interpreter: small tiles, so tiny tests still span several
        return dict(BLOCK_M=DOT_MIN, BLOCK_N=32, BLOCK_K=min(group_size, 32))
    block_m = DOT_MIN if M <= DOT_MIN else 32 if M <= 32 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=64 if M <= 64 else 128, BLOCK_K=min(group_size, 64), num_warps=4,
                num_stages=3)


def choose_split_k(M: int, N: int, K: int, config: dict, device: torch.device, sms: int | None = None) -> int:
    """Split K when the output tiles alone would leave SMs idle (two programs per SM keep the loads flowing).
    sms: the device's SM count (default: asked of the device)."""
    if device.type != "cuda":   # the interpreter runs programs one by one: splitting only adds programs
        return 1
    tiles = -(-M // config["BLOCK_M"]) * -(-N // config["BLOCK_N"])
    return max(1, min(K // config["BLOCK_K"], -(-2 * (sms or num_sms(device)) // tiles)))


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
             group_size: int, split_k: int | None = None) -> torch.Tensor:
    M, K = x.shape
    N = qweight.shape[1] * AWQ_PACK_FACTOR
    assert x.stride(1) == 1 and qweight.is_contiguous() and scales.is_contiguous() and qzeros.is_contiguous()
    assert K % group_size == 0 and group_size % DOT_MIN == 0, f"K={K}, group_size={group_size}"
    config = gemm_config(M, group_size, x.device)
    split_k = split_k or choose_split_k(M, N, K, config, x.device)
    out = torch.empty(split_k, M, N, dtype=torch.float32 if split_k > 1 else x.dtype, device=x.device)
    if M == 0:
        return out[0]
    grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]), split_k)
    _awq_gemm_kernel[grid](
        x, qweight, scales, qzeros, out, M, N, K, split_k,
        x.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), out.stride(0), out.stride(1),
        GROUP_SIZE=group_size, DOT_PRECISION=dot_precision(x.dtype), **config,
    )
    return out[0] if split_k == 1 else out.sum(0).to(x.dtype)
