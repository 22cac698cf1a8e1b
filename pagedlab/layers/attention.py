"""Paged attention: each layer writes its new K/V into the block-paged cache, then attends through block tables.

The runner publishes the batch layout once per forward pass with `set_attention_metadata`, so model code only
ever calls `attn(q, k, v)` and never sees slots or block tables.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedlab.kernels import paged_decode_attention, paged_prefill_attention, write_kv_cache
from pagedlab.kernels.reference import context_attention


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor       # int64 [T]: cache slot (block * block_size + offset) of each new token; < 0 skips
    query_start_loc: torch.Tensor    # int32 [B+1]: sequence b's new tokens are rows [qsl[b], qsl[b+1]) of the batch
    seq_lens: torch.Tensor           # int32 [B]: context length of each sequence after this step
    block_tables: torch.Tensor       # int32 [B, M]: physical blocks of each sequence (rows padded)
    max_query_len: int
    max_seq_len: int
    is_decode: bool                  # every sequence computes exactly one token


_metadata: AttentionMetadata | None = None


def set_attention_metadata(metadata: AttentionMetadata | None) -> None:
    global _metadata
    _metadata = metadata


def get_attention_metadata() -> AttentionMetadata:
    if _metadata is None:
        raise RuntimeError("no attention metadata is set: the model must run inside ModelRunner")
    return _metadata


class PagedAttention(nn.Module):
    """sliding_window: this layer's queries see only their last sliding_window keys (None: all of them); softcap:
    scores soft-capped to softcap * tanh(scores / softcap) (Gemma 2). Both are per layer, passed to the kernels."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window, self.softcap = sliding_window, softcap
        self.k_cache: torch.Tensor | None = None   # [num_blocks, block_size, Hkv, D], bound by the runner
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None   # fp8 caches store k / k_scale: per layer, set by the runner
        self.v_scale: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
        meta = get_attention_metadata()
        if self.k_cache is None:
            return self._causal_attention(q, k, v, meta)
        write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        if meta.is_decode:
            return paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                          self.scale, self.k_scale, self.v_scale, sliding_window=self.sliding_window,
                                          softcap=self.softcap)
        return paged_prefill_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.query_start_loc,
                                       meta.seq_lens, self.scale, meta.max_query_len, self.k_scale, self.v_scale,
                                       sliding_window=self.sliding_window, softcap=self.softcap)

    def _causal_attention(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        """No cache bound (the memory-profiling pass): each sequence's new tokens are its whole context.
        K/V heads are repeated for GQA so that any SDPA backend, flash included, can take the call. SDPA has no
        soft-capping: those layers take the float32 reference."""
        if self.softcap:
            out = torch.empty_like(q)
            bounds = meta.query_start_loc.tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                out[start:end] = context_attention(q[start:end], k[start:end].float(), v[start:end].float(),
                                                   self.scale, 0, self.sliding_window, self.softcap).to(q.dtype)
            return out
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = torch.empty_like(q)
        bounds = meta.query_start_loc.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            mask = None
            if self.sliding_window:     # True where a key is visible: causal and within the window
                pos = torch.arange(end - start, device=q.device)
                distance = pos[:, None] - pos[None, :]
                mask = (distance >= 0) & (distance < self.sliding_window)
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                attn_mask=mask, is_causal=mask is None, scale=self.scale).transpose(0, 1)
        return out
