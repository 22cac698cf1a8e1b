"""Pure-torch references for every kernel in this package, with the same signatures.

They are the specification the Triton kernels are tested against, and the implementation the engine uses
when there is no GPU. Attention is computed one sequence at a time in float32, the plainest way there is:
gather the sequence's K/V by position through the block table, then softmax(QK^T)V with a causal mask.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448: values beyond saturate instead of turning into NaN
FP8_MIN_SCALE = 1e-12                 # an all-zero row keeps a finite scale


def quantize(x: torch.Tensor, dtype: torch.dtype, scale) -> torch.Tensor:
    """x in the cache's dtype: fp8 caches store x / scale, saturated to the fp8 range."""
    if dtype != FP8_DTYPE:
        return x.to(dtype)
    scale = 1.0 if scale is None else scale
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize(x: torch.Tensor, scale) -> torch.Tensor:
    """x as float32: fp8 values are multiplied by their scale."""
    if x.dtype != FP8_DTYPE:
        return x.float()
    return x.float() * (1.0 if scale is None else scale)


def write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Store token t's key/value [Hkv, D] at slot_mapping[t] (block * block_size + offset); slot < 0 skips t."""
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = quantize(key[valid], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = quantize(value[valid], v_cache.dtype, v_scale)


def gather_kv(cache, block_table, seq_len: int, scale, start: int = 0) -> torch.Tensor:
    """Positions [start, seq_len) of one sequence, [seq_len - start, Hkv, D] float32, in position order."""
    block_size = cache.shape[1]
    positions = torch.arange(start, seq_len, device=cache.device)
    blocks = block_table[positions // block_size].long()
    return dequantize(cache[blocks, positions % block_size], scale)


def window_start(first_query_pos: int, sliding_window: int | None) -> int:
    """The first key position any query at or after first_query_pos may see: a sliding window of w keys ends at
    the query (position p sees p - w + 1 .. p, as transformers' sliding masks do)."""
    return 0 if not sliding_window else max(0, first_query_pos - sliding_window + 1)


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's logit soft-capping: cap * tanh(scores / cap)."""
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def context_attention(query, key, value, scale: float, key_start: int = 0, sliding_window: int | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """Causal attention of the last q_len positions of a sequence, in float32.

    query [q_len, Hq, D]; key/value [n, Hkv, D] hold positions [key_start, key_start + n), the sequence's last
    ones. Query i sits at position key_start + n - q_len + i. sliding_window: each query sees its last w keys.
    """
    q_len, num_heads, _ = query.shape
    num_keys, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    k = key.repeat_interleave(group, dim=1).transpose(0, 1)    # [Hq, n, D]
    v = value.repeat_interleave(group, dim=1).transpose(0, 1)
    q = query.float().transpose(0, 1)                          # [Hq, q_len, D]
    scores = soft_cap((q @ k.transpose(1, 2)) * scale, softcap)    # [Hq, q_len, n]
    seq_len = key_start + num_keys
    q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
    k_pos = torch.arange(key_start, seq_len, device=query.device)
    hidden = k_pos[None, :] > q_pos[:, None]
    if sliding_window:
        hidden |= k_pos[None, :] <= q_pos[:, None] - sliding_window
    scores = scores.masked_fill(hidden, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(0, 1)        # [q_len, Hq, D]


def paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, scale,
                               k_scale=None, v_scale=None, num_splits=None, out=None, sliding_window=None,
                               softcap=None) -> torch.Tensor:
    """One new token per sequence attends to its whole context (its last sliding_window keys, if given), reading
    no key outside it. num_splits is accepted and ignored."""
    out = torch.empty_like(query) if out is None else out
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:  # a padding entry: no context
            out[b] = 0
            continue
        start = window_start(seq_len - 1, sliding_window)
        k = gather_kv(k_cache, block_tables[b], seq_len, k_scale, start)
        v = gather_kv(v_cache, block_tables[b], seq_len, v_scale, start)
        out[b] = context_attention(query[b:b + 1], k, v, scale, start, sliding_window, softcap)[0].to(query.dtype)
    return out


def paged_prefill_attention_ref(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                max_query_len, k_scale=None, v_scale=None, out=None, sliding_window=None,
                                softcap=None) -> torch.Tensor:
    """The packed new tokens of each sequence attend causally to the cached prefix and to each other."""
    out = torch.empty_like(query) if out is None else out
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        begin, end = starts[b], starts[b + 1]
        if end == begin:
            continue
        start = window_start(seq_len - (end - begin), sliding_window)
        k = gather_kv(k_cache, block_tables[b], seq_len, k_scale, start)
        v = gather_kv(v_cache, block_tables[b], seq_len, v_scale, start)
        out[begin:end] = context_attention(query[begin:end], k, v, scale, start, sliding_window,
                                           softcap).to(query.dtype)
    return out


def copy_blocks_ref(k_caches, v_caches, block_mapping) -> None:
    """Copy-on-write: block dst := block src in every layer, for each (src, dst) row of block_mapping."""
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    for k_cache, v_cache in zip(k_caches, v_caches):
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


def swap_blocks_ref(src_cache, dst_cache, block_mapping) -> None:
    """Copy whole blocks between caches on different devices (GPU <-> pinned CPU) for each (src, dst) row.

    One copy per block: a block is contiguous in both caches, so each is a single DMA that is asynchronous
    when the CPU side is pinned. The copies are ordered on the current stream, so later GPU work sees them;
    synchronize before the CPU reads or overwrites a pinned block involved. block_mapping should live on
    the CPU (reading it from the GPU would synchronize).
    """
    non_blocking = src_cache.is_pinned() or dst_cache.is_pinned()
    for src, dst in block_mapping.tolist():
        dst_cache[dst].copy_(src_cache[src], non_blocking=non_blocking)


# --- AWQ (AutoAWQ's GEMM format) -------------------------------------------------------------------------------
# A packed int32 holds 8 4-bit values of 8 neighbouring output columns; nibble i (bits 4i..4i+3) holds column
# AWQ_PACK_ORDER[i] of the 8, so column j sits at nibble AWQ_PACK_ORDER.index(j) = j // 2 + 4 * (j % 2).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_PACK_FACTOR = 8


def awq_unpack_ref(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] -> the 4-bit values, int32 [R, C], in column order."""
    columns = torch.arange(AWQ_PACK_FACTOR, device=packed.device)
    shifts = 4 * (columns // 2 + 4 * (columns % 2))
    return ((packed[:, :, None] >> shifts) & 0xF).reshape(packed.shape[0], -1)


def awq_dequantize_ref(qweight, scales, qzeros, group_size: int) -> torch.Tensor:
    """W [K, N] in scales' dtype: W[k, n] = (q[k, n] - zero[k // G, n]) * scale[k // G, n].

    qweight int32 [K, N / 8], qzeros int32 [K / G, N / 8], scales [K / G, N]."""
    zeros = awq_unpack_ref(qzeros).repeat_interleave(group_size, dim=0)
    return (awq_unpack_ref(qweight) - zeros).to(scales.dtype) * scales.repeat_interleave(group_size, dim=0)


def awq_gemm_ref(x, qweight, scales, qzeros, group_size: int) -> torch.Tensor:
    """x [M, K] @ the dequantized W [K, N] -> [M, N] in x's dtype."""
    return x @ awq_dequantize_ref(qweight, scales, qzeros, group_size).to(x.dtype)


def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (fp8 [R, C], float32 scales [R, 1]) with x ~ fp8 * scale, each row's max |x| at 448."""
    # times 1/448 rather than / 448: torch divides by a Python number that way on GPUs, and so does the kernel
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=FP8_MIN_SCALE) * (1 / FP8_MAX)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


# --- Mixture of experts ----------------------------------------------------------------------------------------
def fused_moe_ref(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) with expert_e(x) = w2[e] @ (silu(g) * u),
    [g; u] = w13[e] @ x. x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights float [T, k]; topk_ids int [T, k].
    Expert by expert, as transformers computes it: out[t] accumulates in x's dtype."""
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():
        tokens, slots = torch.where(topk_ids == expert)
        gate, up = (x[tokens] @ w13[expert].t()).chunk(2, dim=-1)
        hidden = (torch.nn.functional.silu(gate) * up) @ w2[expert].t()
        out.index_add_(0, tokens, (hidden * topk_weights[tokens, slots, None]).to(x.dtype))
    return out
