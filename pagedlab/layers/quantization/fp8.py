"""FP8 weights (vLLM's quantization="fp8"): an unquantized checkpoint is quantized to e4m3 as it loads, with one
scale per output channel (each row's max |w| maps to 448), which halves the linear layers' memory next to bf16.

On GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper) activations are quantized per token on the
fly, with a dynamic scale per row, and torch._scaled_mm multiplies the two in fp8, scaling rows and columns of the
product. Elsewhere (the CPU, older GPUs) the weight is dequantized to the activations' dtype for an ordinary
matmul, so only the weights carry fp8 error.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pagedlab.kernels import quantize_rows_fp8
from pagedlab.kernels.reference import FP8_DTYPE, quantize_rows_fp8_ref
from pagedlab.layers.quantization.base import QuantizationConfig, QuantMethod, new_parameter


@functools.cache
def has_fp8_matmul(device: torch.device) -> bool:
    """Whether torch._scaled_mm takes row-wise scales on device: fp8 tensor cores need compute capability 8.9+,
    and some torch builds support row-wise scaling on 9.0+ only, so one tiny product decides."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    probe = torch.zeros(16, 16, dtype=FP8_DTYPE, device=device)
    scale = torch.ones(16, 1, dtype=torch.float32, device=device)    # explicit: models build under their own dtype
    try:
        torch._scaled_mm(probe, probe.t(), scale_a=scale, scale_b=scale.view(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def fp8_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] @ weight [N, K]^T in fp8: per-token scales for x, the per-channel weight_scale [N] for weight.
    Row-wise scaled fp8 GEMMs produce bf16 (the dtype cuBLASLt supports for them), cast to x's dtype."""
    x_fp8, x_scale = quantize_rows_fp8(x.contiguous())
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                           out_dtype=torch.bfloat16).to(x.dtype)
    return out if bias is None else out + bias


class Fp8LinearMethod(QuantMethod):
    def create_weights(self, layer, in_features, out_sizes, dtype):
        out_features = sum(out_sizes)
        layer.weight = new_parameter((out_features, in_features), FP8_DTYPE, output_dim=0)
        # derived while loading, not a checkpoint tensor: a buffer, so the loader does not expect it
        layer.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        # _scaled_mm needs both GEMM dims divisible by 16
        layer.use_scaled_mm = (has_fp8_matmul(layer.weight.device)
                               and in_features % 16 == 0 and out_features % 16 == 0)

    def load_weight(self, layer, param, tensor, start, end):
        if param is not layer.weight:
            return super().load_weight(layer, param, tensor, start, end)
        weight, scale = quantize_rows_fp8_ref(tensor.to(param.device))  # per output channel; shards load alone
        super().load_weight(layer, param, weight, start, end)
        layer.weight_scale[start:end] = scale.view(-1)

    def apply(self, layer, x):
        if layer.use_scaled_mm:
            return fp8_scaled_mm(x, layer.weight, layer.weight_scale, layer.bias)
        weight = layer.weight.to(x.dtype) * layer.weight_scale[:, None].to(x.dtype)
        return F.linear(x, weight, layer.bias)


class Fp8Config(QuantizationConfig):
    name = "fp8"

    def get_quant_method(self) -> QuantMethod:
        return Fp8LinearMethod()
