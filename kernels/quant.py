"""Triton kernel that quantizes activations to fp8 row by row (one scale per token) for the fp8 GEMM.

The torch version takes eight element-wise kernels (abs, max, clamp, two divisions, clamp, cast...): at decode
batch sizes their launches cost more than the fp8 GEMM saves. Here one program per row reads the row twice, once
for its max |x| and once to scale, saturate and cast, with the reference's arithmetic (the scale is max |x| times
1/448, x / scale an IEEE fp32 division, the cast rounds to nearest even), so the result is the same bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference

FP8_MAX = tl.constexpr(reference.FP8_MAX)
INV_FP8_MAX = tl.constexpr(1 / reference.FP8_MAX)
MIN_SCALE = tl.constexpr(reference.FP8_MIN_SCALE)
MAX_BLOCK = 4096    # columns a program holds at once; longer rows take several passes of the loop


@triton.jit
def _quantize_rows_kernel(x, out, scales, num_cols, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, out_row = x + row * stride_x, out + row * stride_out
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, num_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + cols, mask=cols < num_cols, other=0.0).to(tl.float32)))
    scale = tl.maximum(tl.max(amax, 0), MIN_SCALE) * INV_FP8_MAX
    tl.store(scales + row, scale)
    for start in range(0, num_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_cols
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(v, scale), -FP8_MAX, FP8_MAX)
        tl.store(out_row + cols, q.to(out.dtype.element_ty), mask=mask)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    assert x.stride(1) == 1
    out = torch.empty(rows, cols, dtype=reference.FP8_DTYPE, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block = min(triton.next_power_of_2(cols), MAX_BLOCK)
        _quantize_rows_kernel[(rows,)](x, out, scales, cols, x.stride(0), out.stride(0), BLOCK=block,
                                       num_warps=4 if block <= 1024 else 8)
    return out, scales
