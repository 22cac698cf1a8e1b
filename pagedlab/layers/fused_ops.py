"""Triton kernels for the small element-wise layers on the GPU: RMSNorm (with its residual add), SiLU-and-mul, rotary.

In eager torch each of these is a chain of kernels that re-reads the activations: RMSNorm with a residual is ~8
launches and ~11 passes over [T, hidden], rotary ~10 launches for q and k. At prefill that is more memory traffic
than the matmuls' weights; in a decode step (a CUDA graph of ~35 kernels a layer) it is hundreds of tiny kernels.
Each kernel here is one pass and one launch, and rounds to the model dtype exactly where the torch code does
(after the add, after the normalization, after each product), so results match the torch layers up to the order
of one reduction. Used on CUDA tensors unless PAGEDLAB_FUSED_OPS=0; everything else runs the torch code.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install
    triton = None

ENABLED = os.environ.get("PAGEDLAB_FUSED_OPS", "1") != "0"


def use_fused(x: torch.Tensor) -> bool:
    return ENABLED and triton is not None and x.is_cuda


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                         hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < hidden
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        dtype = x.dtype
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / hidden
        y = (h * tl.rsqrt(var + eps)).to(dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * y.to(tl.float32)).to(dtype), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)

    @triton.jit
    def _rotate_heads(src, dst, stride_src_h, stride_dst_h, num_heads, c, s, offs_d, d_mask,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        heads = tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < num_heads) & d_mask[None, :]
        src_ptrs = src + heads[:, None] * stride_src_h + offs_d[None, :]
        x1 = tl.load(src_ptrs, mask=mask, other=0.0)
        x2 = tl.load(src_ptrs + HALF, mask=mask, other=0.0)
        dtype = x1.dtype
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        o1 = ((a * c).to(dtype).to(tl.float32) - (b * s).to(dtype).to(tl.float32)).to(dtype)
        o2 = ((b * c).to(dtype).to(tl.float32) + (a * s).to(dtype).to(tl.float32)).to(dtype)
        dst_ptrs = dst + heads[:, None] * stride_dst_h + offs_d[None, :]
        tl.store(dst_ptrs, o1, mask=mask)
        tl.store(dst_ptrs + HALF, o2, mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, q_out, k_out, pos_ptr, cos_ptr, sin_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                       stride_cos, num_q_heads, num_kv_heads,
                       HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HALF
        c = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        _rotate_heads(q_ptr + t * stride_qt, q_out + t * stride_qot, stride_qh, stride_qoh, num_q_heads, c, s,
                      offs_d, d_mask, HALF, BLOCK_HQ)
        _rotate_heads(k_ptr + t * stride_kt, k_out + t * stride_kot, stride_kh, stride_koh, num_kv_heads, c, s,
                      offs_d, d_mask, HALF, BLOCK_HK)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * normalize(x [+ residual]) -> out, or (out, x + residual) with a residual; x [..., hidden]."""
    shape, hidden = x.shape, x.shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1 and weight.is_contiguous() and weight.dtype == x.dtype
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    rows = x2.shape[0]
    block = triton.next_power_of_2(hidden)
    warps = min(16, max(1, block // 512))
    if residual is None:
        if rows:
            _rms_norm_kernel[(rows,)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, hidden, eps,
                                      HAS_RESIDUAL=False, BLOCK=block, num_warps=warps)
        return out.view(shape)
    r2 = residual.reshape(-1, hidden)
    assert r2.stride(-1) == 1 and residual.dtype == x.dtype
    res_out = torch.empty_like(out)
    if rows:
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0),
                                  res_out.stride(0), hidden, eps, HAS_RESIDUAL=True, BLOCK=block, num_warps=warps)
    return out.view(shape), res_out.view(shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x [..., 2d]."""
    shape, d = x.shape, x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    assert x2.stride(-1) == 1
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(d))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d,
                                                                    BLOCK=block, num_warps=4)
    return out.view(*shape[:-1], d)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF's rotate-half rotary embedding of q [T, Hq, D] and k [T, Hkv, D] (any token/head strides, contiguous
    last dim) at `positions` [T], from cos/sin tables [max_position, D/2]; returns new contiguous (q, k)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.is_contiguous() and sin.is_contiguous()
    assert cos.shape[1] * 2 == head_dim
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, q_out, k_out, positions, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1), cos.stride(0), num_q_heads, num_kv_heads,
            HALF=half, BLOCK_D=triton.next_power_of_2(half), BLOCK_HQ=triton.next_power_of_2(num_q_heads),
            BLOCK_HK=triton.next_power_of_2(num_kv_heads), num_warps=4)
    return q_out, k_out
