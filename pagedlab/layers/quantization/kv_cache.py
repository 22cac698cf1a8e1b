"""Per-layer scales of fp8 (e4m3) KV caches, calibrated once at startup.

An fp8 cache stores x / scale. e4m3 has 3 mantissa bits across normal numbers from 2^-6 to 448 (a range of 2^15),
so the scale only decides where that range sits: too small and large K/V saturate at 448 x scale, too large and
small ones fall into subnormals, losing precision. Elements under 2^-8 of a vector's largest barely move
attention, so any scale from amax / 448 to amax / 4 serves: a window of about 2^7, to be hit rather than matched.

A fixed scale of 1.0 (vLLM's default without calibration) hits it for K and V of moderate size, but not for a
layer whose V is small (it falls into subnormals) or whose K has outliers past 448 (they saturate);
tests/test_quantization.py shows both on a rescaled model. So each layer gets its own K and V scale from one
forward pass over random token sequences, with KV_SCALE_HEADROOM times the largest |K| / |V| it produced mapped to
448: real text may go 8x beyond what random tokens reach before saturating, and values down to 2^-12 of the
calibrated maximum stay normal.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
KV_SCALE_HEADROOM = 8.0
CALIBRATION_SEQS, CALIBRATION_LEN = 4, 256
MIN_SCALE = 1e-6


@torch.inference_mode()
def calibrate_kv_scales(attention_layers: list[nn.Module], run_uncached: Callable[[torch.Tensor, list[int]], object],
                        vocab_size: int, bos_token_id: int | None, max_len: int, device: torch.device) -> None:
    """Set each PagedAttention layer's k_scale / v_scale (1-element float32 tensors on device).

    run_uncached(input_ids, seq_lens) runs the model over packed sequences without a cache; each sequence here
    is random tokens after the BOS token (first-token activations are often outliers).
    """
    seq_len = min(CALIBRATION_LEN, max_len)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(vocab_size, (CALIBRATION_SEQS, seq_len), generator=generator)
    if bos_token_id is not None:
        input_ids[:, 0] = bos_token_id
    amax = {layer: torch.zeros(2, dtype=torch.float32, device=device) for layer in attention_layers}

    def record(layer, args):
        _, key, value = args
        amax[layer] = torch.maximum(amax[layer], torch.stack([key.abs().amax(), value.abs().amax()]).float())

    hooks = [layer.register_forward_pre_hook(record) for layer in attention_layers]
    try:
        run_uncached(input_ids.flatten().to(device), [seq_len] * CALIBRATION_SEQS)
    finally:
        for hook in hooks:
            hook.remove()
    for layer, k_and_v_max in amax.items():
        scales = (k_and_v_max * KV_SCALE_HEADROOM / FP8_MAX).clamp(min=MIN_SCALE)
        layer.k_scale, layer.v_scale = scales[0:1].clone(), scales[1:2].clone()
