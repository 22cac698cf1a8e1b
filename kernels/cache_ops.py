"""Triton kernels that write and copy KV-cache blocks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .triton_utils import scale_pointer

COPY_CHUNK = 4096  # elements of one block copied by one program
FP8_MAX = tl.constexpr(reference.FP8_MAX)


@triton.jit
def _quantize(x, scale_ptr):
    """x / scale, saturated to the fp8 range (as the reference does)."""
    return tl.clamp(x.to(tl.float32) / tl.load(scale_ptr), -FP8_MAX, FP8_MAX)


@triton.jit
def _write_kv_cache_kernel(
    key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, stride_cache_token, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
):
    # One program per token: all its heads at once, a contiguous [Hkv, D] run in the cache.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:  # a padding token
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    cache_offset = ((slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_token
                    + heads * stride_cache_head + dims)

    k = tl.load(key + token * stride_kt + heads * stride_kh + dims, mask=mask)
    if FP8:
        k = _quantize(k, k_scale)
    tl.store(k_cache + cache_offset, k.to(k_cache.dtype.element_ty), mask=mask)
    v = tl.load(value + token * stride_vt + heads * stride_vh + dims, mask=mask)
    if FP8:
        v = _quantize(v, v_scale)
    tl.store(v_cache + cache_offset, v.to(v_cache.dtype.element_ty), mask=mask)


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    assert key.stride(2) == value.stride(2) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    if num_tokens == 0:
        return
    fp8 = k_cache.dtype == reference.FP8_DTYPE
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, scale_pointer(k_scale, k_cache), scale_pointer(v_scale, v_cache),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], FP8=fp8,
    )


@triton.jit
def _copy_blocks_kernel(k_cache, v_cache, block_mapping, block_numel, CHUNK: tl.constexpr):
    # Program (pair, chunk) copies elements [chunk * CHUNK, (chunk + 1) * CHUNK) of block src to block dst.
    pair = tl.program_id(0)
    src = tl.load(block_mapping + 2 * pair)
    dst = tl.load(block_mapping + 2 * pair + 1)
    offsets = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = offsets < block_numel
    k = tl.load(k_cache + src * block_numel + offsets, mask=mask)
    tl.store(k_cache + dst * block_numel + offsets, k, mask=mask)
    v = tl.load(v_cache + src * block_numel + offsets, mask=mask)
    tl.store(v_cache + dst * block_numel + offsets, v, mask=mask)


def copy_blocks(k_caches, v_caches, block_mapping) -> None:
    """One launch per layer. Destination blocks must be distinct and never also a source (copy-on-write
    copies into fresh blocks), since all pairs are copied in parallel."""
    num_pairs = block_mapping.shape[0]
    if num_pairs == 0:
        return
    block_mapping = block_mapping.to(device=k_caches[0].device, dtype=torch.int64).contiguous()
    for k_cache, v_cache in zip(k_caches, v_caches):
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        block_numel = k_cache[0].numel()
        chunk = min(COPY_CHUNK, triton.next_power_of_2(block_numel))
        grid = (num_pairs, triton.cdiv(block_numel, chunk))
        _copy_blocks_kernel[grid](k_cache, v_cache, block_mapping, block_numel, CHUNK=chunk)
