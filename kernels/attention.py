"""Triton paged attention: decode (split-KV "flash decoding") and prefill (causal, over a cached prefix).

Both kernels walk a sequence's context in tiles of BLOCK_N token positions. Each position is mapped to its
cache slot through the block table (block = table[pos // block_size], offset = pos % block_size), so a
tile may span many small blocks or lie inside one large block: the block size only changes the lookup.
All query heads that share a KV head are processed by one program, so each K/V tile is loaded once per
KV head (GQA). Scores use exp2 with log2(e) folded into the softmax scale; statistics accumulate in fp32.

Sliding windows (Mistral, Gemma 2/3): a query at position p sees keys p - window + 1 .. p. A program starts its walk
at the tile holding the first key any of its queries sees, and masks the keys below each row's window, so no key
before the window is ever read. Soft-capping (Gemma 2) maps scores to softcap * tanh(scores / softcap) before the
softmax; in log2 units that is the same map with softcap * log2(e).

fp8 caches: fp8 -> query dtype is exact for e4m3, so K/V tiles are converted directly and the scales are
applied outside the matmuls (k_scale into the score scale, v_scale into the output), which equals
dequantizing every element as fp32 x scale.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import FP8_DTYPE
from .triton_utils import device_arch, dot_precision, num_sms, scale_pointer

MIN_TOKENS_PER_SPLIT = 256  # shorter splits cost more in partial results and merging than they gain
MAX_SPLITS = 32
DOT_MIN_ROWS = 16  # tl.dot needs at least 16 rows


@triton.jit
def _attend_tile(q, m, l, acc, k_cache, v_cache, block_table, tile_start, kv_start, kv_end, q_pos, qk_scale,
                 softcap, window, cache_head, d_mask, stride_cache_block, stride_cache_token,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SLIDING: tl.constexpr,
                 SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_KV: tl.constexpr = True,
                 EVEN_D: tl.constexpr = False):
    """Fold the keys/values at positions [tile_start, tile_start + BLOCK_N) within [kv_start, kv_end) into each
    query row's running max m, sum l and unnormalized output acc (online softmax, as in FlashAttention).

    Positions map to cache slots through the block table. Scores are in log2 units (softcap too). CAUSAL hides
    keys after each row's position q_pos, SLIDING those before its window; without them every key of the tile
    must be visible to every row. MASK_KV=False: the caller knows the whole tile lies inside [kv_start, kv_end),
    so its loads go unmasked (EVEN_D: and head_dim is a power of two, so no dimension is masked either).
    """
    pos = tile_start + tl.arange(0, BLOCK_N)
    if MASK_KV:
        in_range = (pos >= kv_start) & (pos < kv_end)
        block = tl.load(block_table + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    else:
        block = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
    tokens = block * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_token
    kv_ptrs = tokens[:, None] + cache_head
    if MASK_KV:
        kv_mask = in_range[:, None] & d_mask[None, :]
        k = tl.load(k_cache + kv_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache + kv_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
    elif EVEN_D:
        k = tl.load(k_cache + kv_ptrs).to(q.dtype)
        v = tl.load(v_cache + kv_ptrs).to(q.dtype)
    else:
        k = tl.load(k_cache + kv_ptrs, mask=d_mask[None, :], other=0.0).to(q.dtype)
        v = tl.load(v_cache + kv_ptrs, mask=d_mask[None, :], other=0.0).to(q.dtype)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if SOFTCAP:     # softcap * tanh(s / softcap), tanh(y) = 1 - 2 / (e^2y + 1)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    if CAUSAL:
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    if SLIDING:
        s = tl.where(pos[None, :] > q_pos[:, None] - window, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    if SLIDING:     # a row may see no key of this tile yet: keep its statistics at zero, not NaN
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def _decode_split_kernel(
    query, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, partial_out, partial_lse,
    qk_scale, softcap, window,
    stride_qb, stride_qh,
    stride_cache_block, stride_cache_token, stride_cache_head,
    stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, FP8: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (seq, kv_head, split): the GROUP query heads of kv_head over one range of the context (its window).
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    kv_start = tl.maximum(seq_len - window, 0) if SLIDING else 0
    first_tile = kv_start // BLOCK_N * BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - first_tile, BLOCK_N), NUM_SPLITS)
    start = first_tile + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    head_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(query + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_mask[:, None] & d_mask[None, :], other=0.0)
    if FP8:
        qk_scale *= tl.load(k_scale)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    block_table = block_tables + seq * stride_bt
    cache_head = kv_head * stride_cache_head + offs_d[None, :]
    # Splits are whole tiles, so only the sequence's last tile has keys past the end: the new token's
    # causal mask (position seq_len - 1) hides exactly those.
    q_pos = tl.full([BLOCK_G], seq_len - 1, tl.int32)
    for tile_start in range(start, end, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache, v_cache, block_table, tile_start, kv_start, end, q_pos,
                                 qk_scale, softcap, window, cache_head, d_mask, stride_cache_block,
                                 stride_cache_token, BLOCK_SIZE, BLOCK_N, CAUSAL=True, SLIDING=SLIDING,
                                 SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION)

    if FP8:
        acc *= tl.load(v_scale)
    l = tl.where(l > 0, l, 1.0)  # l == 0: this split got no tokens; out = 0 and lse = m = -inf
    out_ptrs = partial_out + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(out_ptrs, (acc / l[:, None]).to(partial_out.dtype.element_ty), mask=head_mask[:, None] & d_mask[None, :])
    if NUM_SPLITS > 1:
        tl.store(partial_lse + seq * stride_lb + heads * stride_lh + split, m + tl.log2(l), mask=head_mask)


@triton.jit
def _decode_merge_kernel(
    partial_out, partial_lse, out,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (seq, head): out = sum_s w_s * out_s / sum_s w_s with w_s = 2^lse_s (the split's softmax mass).
    seq, head = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_mask = offs_s < NUM_SPLITS
    lse = tl.load(partial_lse + seq * stride_lb + head * stride_lh + offs_s, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # seq_len 0: every split is empty
    weights = tl.exp2(lse - lse_max)
    parts = tl.load(partial_out + seq * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=split_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(weights, 0)
    merged = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + seq * stride_ob + head * stride_oh + offs_d, merged.to(out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, sms: int) -> int:
    """Split each context when batch x kv-heads programs alone would leave SMs idle (two programs per SM
    keep the memory system busy), but never into splits shorter than MIN_TOKENS_PER_SPLIT."""
    wanted = -(-2 * sms // (batch * num_kv_heads))
    most = max(1, max_context // MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, most, MAX_SPLITS))


def decode_num_splits(batch: int, num_kv_heads: int, table_width: int, block_size: int,
                      sliding_window: int | None, sms: int) -> int:
    """The split count paged_decode_attention chooses itself: the block table's width bounds every context (read
    without synchronizing on seq_lens), and a sliding window bounds what a query reads."""
    max_context = min(table_width * block_size, sliding_window or math.inf)
    return choose_num_splits(batch, num_kv_heads, max_context, sms)


def decode_config(device: torch.device, head_dim: int) -> dict:
    """Tile size and launch options of the decode kernel (tuned on an H100 with bench_kernels.py)."""
    if device.type != "cuda":  # the interpreter: small tiles, so tiny test contexts span several tiles
        return dict(BLOCK_N=16)
    return dict(BLOCK_N=64 if head_dim <= 128 else 32, num_warps=4, num_stages=3)


def prefill_config(device: torch.device, head_dim: int) -> dict:
    """Tile sizes (BLOCK_M rows = new tokens x heads of a group) and launch options of the prefill kernel.

    Hopper (sm90+): 128-row tiles with 64 keys and 8 warps (two warpgroups), which wgmma takes whole, and a
    3-stage pipeline of K/V loads; head dims above 128 halve the rows to stay inside shared memory."""
    if device.type != "cuda":   # the interpreter: two row classes, so the tests meet more than one tile shape
        return dict(BLOCK_M=32, BLOCK_N=16)
    return prefill_config_for_arch(device_arch(device), head_dim)


def prefill_config_for_arch(arch: int, head_dim: int) -> dict:
    """prefill_config of a GPU of compute capability arch (major x 10 + minor)."""
    if arch >= 90:
        if head_dim <= 128:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)


def prefill_tiles(max_query_len: int, group: int, config: dict) -> dict:
    """The prefill kernel's tile constexprs for a batch whose longest chunk is max_query_len: rows = new tokens x
    the group's heads (BLOCK_G, a power of two); decode-heavy batches (short chunks) get fewer rows, down to the 16
    tl.dot needs. config: prefill_config's. Returns BLOCK_G, BLOCK_Q, BLOCK_N and the launch options."""
    block_g = triton.next_power_of_2(group)
    block_m = min(config["BLOCK_M"], max(DOT_MIN_ROWS, triton.next_power_of_2(max_query_len * block_g)))
    tiles = {k: v for k, v in config.items() if k != "BLOCK_M"}
    return dict(BLOCK_G=block_g, BLOCK_Q=max(1, block_m // block_g), **tiles)


def _window_and_softcap(sliding_window, softcap) -> dict:
    """The kernels' runtime window/softcap arguments (softcap in log2 units) and their constexpr switches."""
    return dict(softcap=(softcap or 1.0) * math.log2(math.e), window=sliding_window or 0,
                SLIDING=bool(sliding_window), SOFTCAP=bool(softcap))


def paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale,
                           k_scale=None, v_scale=None, num_splits=None, out=None, sliding_window=None,
                           softcap=None) -> torch.Tensor:
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert query.stride(2) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size, sliding_window,
                                       num_sms(query.device))

    out = torch.empty_like(query) if out is None else out
    if batch == 0:
        return out
    if num_splits == 1:  # stage 1 writes the final output, as the single split of [B, Hq, 1, D]; no lse
        partial_out, partial_lse = out.unsqueeze(2), out
    else:
        partial_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        partial_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=query.device)
    block_d = triton.next_power_of_2(head_dim)
    flags = _window_and_softcap(sliding_window, softcap)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens,
        scale_pointer(k_scale, k_cache), scale_pointer(v_scale, v_cache), partial_out, partial_lse,
        scale * math.log2(math.e), flags.pop("softcap"), flags.pop("window"),
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        GROUP=group, BLOCK_G=max(DOT_MIN_ROWS, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, FP8=k_cache.dtype == FP8_DTYPE,
        DOT_PRECISION=dot_precision(query.dtype), **flags, **decode_config(query.device, head_dim),
    )
    if num_splits > 1:
        _decode_merge_kernel[(batch, num_heads)](
            partial_out, partial_lse, out,
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
            partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_D=block_d,
        )
    return out


@triton.jit
def _prefill_kernel(
    query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, k_scale, v_scale,
    qk_scale, softcap, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_block, stride_cache_token, stride_cache_head,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (q_tile, seq, kv_head): BLOCK_Q new tokens of seq x the GROUP query heads of kv_head. The last
    # tiles, which see the most keys, go first, so no long program starts in the launch's tail.
    q_tile, seq, kv_head = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    prefix_len = seq_len - q_len  # tokens cached before this step

    # Row r is (new token r // BLOCK_G, head r % BLOCK_G of the group).
    offs_m = tl.arange(0, BLOCK_Q * BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = q_tile * BLOCK_Q + offs_m // BLOCK_G
    heads = kv_head * GROUP + offs_m % BLOCK_G
    row_mask = (q_idx < q_len) & (offs_m % BLOCK_G < GROUP)
    d_mask = offs_d < HEAD_DIM
    q_pos = prefix_len + q_idx
    tokens_q = (q_start + q_idx).to(tl.int64)
    q = tl.load(query + tokens_q[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if FP8:
        qk_scale *= tl.load(k_scale)

    m = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    block_table = block_tables + seq * stride_bt
    cache_head = kv_head * stride_cache_head + offs_d[None, :]
    # Key tiles wholly at or before the first query's position are visible to every row: no mask. The
    # rest, up to the last query's position, are masked. Position 0 is visible to all, so no row is empty.
    # With a sliding window every tile is masked on both sides, from the one holding the first row's first key.
    first_pos = prefix_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    if SLIDING:
        kv_start = tl.maximum(first_pos - window + 1, 0)
        unmasked_end = 0
        masked_start = kv_start // BLOCK_N * BLOCK_N
    else:
        kv_start = 0
        unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
        masked_start = unmasked_end
    # Tiles below the diagonal need no mask at all: every position is inside [0, kv_end) and visible.
    for tile_start in range(0, unmasked_end, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache, v_cache, block_table, tile_start, kv_start, kv_end, q_pos,
                                 qk_scale, softcap, window, cache_head, d_mask, stride_cache_block,
                                 stride_cache_token, BLOCK_SIZE, BLOCK_N, CAUSAL=False, SLIDING=False,
                                 SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION, MASK_KV=False,
                                 EVEN_D=HEAD_DIM == BLOCK_D)
    for tile_start in range(masked_start, kv_end, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache, v_cache, block_table, tile_start, kv_start, kv_end, q_pos,
                                 qk_scale, softcap, window, cache_head, d_mask, stride_cache_block,
                                 stride_cache_token, BLOCK_SIZE, BLOCK_N, CAUSAL=True, SLIDING=SLIDING,
                                 SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION)

    if FP8:
        acc *= tl.load(v_scale)
    if SLIDING:     # rows past the sequence's new tokens may have seen no key; they are not stored
        l = tl.where(l > 0, l, 1.0)
    out_ptrs = out + tokens_q[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, (acc / l[:, None]).to(out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                            max_query_len, k_scale=None, v_scale=None, out=None, sliding_window=None,
                            softcap=None, config: dict | None = None) -> torch.Tensor:
    """config: prefill_config's tiles and launch options to use instead (benchmarks sweep them)."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert query.stride(2) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    out = torch.empty_like(query) if out is None else out
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    group = num_heads // num_kv_heads
    tiles = prefill_tiles(max_query_len, group, config or prefill_config(query.device, head_dim))
    flags = _window_and_softcap(sliding_window, softcap)
    _prefill_kernel[(triton.cdiv(max_query_len, tiles["BLOCK_Q"]), batch, num_kv_heads)](
        query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale_pointer(k_scale, k_cache), scale_pointer(v_scale, v_cache),
        scale * math.log2(math.e), flags.pop("softcap"), flags.pop("window"),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        FP8=k_cache.dtype == FP8_DTYPE, DOT_PRECISION=dot_precision(query.dtype), **flags, **tiles,
    )
    return out
