"""Rotary position embeddings (HF's rotate-half layout), with the cos/sin table precomputed for every position.

Scalings: linear, llama3, and Phi-3's longrope (per-frequency factors, short below the pretrained length and long
above it, chosen per position as vLLM does; cos/sin scaled by the attention factor). A partial rotary factor
(Phi-4-mini) rotates only the first dims of each head.

inv_freq is computed exactly as transformers does (int64 arange cast to float32), so float32 runs match it bit
for bit; cos/sin are cast to the model dtype before use, as transformers does.
"""
import math

import torch
from torch import nn

from pagedlab.layers import fused_ops


def _default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                     original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope_tables(rotary_dim: int, max_position: int, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3's longrope: inv_freq = 1 / (factor_i * theta^(2i/d)) with the short factors for positions below
    original_max_position_embeddings and the long ones from there on; cos and sin times the attention factor."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / original
    attention_factor = params.get("attention_factor") or (
        1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    base = params["rope_theta"] ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)
    positions = torch.arange(max_position, dtype=torch.float32)
    short = torch.outer(positions, 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * base))
    long = torch.outer(positions, 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * base))
    freqs = torch.where(positions[:, None] < original, short, long)
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def rope_parameters(hf_config) -> dict:
    """{"rope_type", "rope_theta", ...}: transformers 5 keeps them in `rope_parameters`, older configs split them
    between `rope_theta` and `rope_scaling`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if getattr(hf_config, "original_max_position_embeddings", None):
        params.setdefault("original_max_position_embeddings", hf_config.original_max_position_embeddings)
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict) -> None:
        super().__init__()
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = _default_inv_freq(self.rotary_dim, params["rope_theta"])
        rope_type = params["rope_type"]
        if rope_type == "longrope":
            cos, sin = _longrope_tables(self.rotary_dim, max_position, params)
        else:
            if rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, params["factor"], params["low_freq_factor"],
                                            params["high_freq_factor"], params["original_max_position_embeddings"])
            elif rope_type == "linear":
                inv_freq = inv_freq / params["factor"]
            elif rope_type != "default":
                raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3, "
                                 "longrope")
            freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
            cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", cos.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("sin", sin.to(torch.get_default_dtype()), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, Hq, D], k [T, Hkv, D] -> rotated (q, k)."""
        if self.rotary_dim < q.shape[-1]:     # partial rotary: the other dims pass through
            rot = self.rotary_dim
            q_rot, k_rot = self._apply(positions, q[..., :rot].contiguous(), k[..., :rot].contiguous())
            return torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)
        return self._apply(positions, q, k)

    def _apply(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if fused_ops.use_fused(q) and self.cos.dtype == q.dtype == k.dtype:
            return fused_ops.rotary(positions, q, k, self.cos, self.sin)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
