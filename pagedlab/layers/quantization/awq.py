"""AWQ checkpoints (AutoAWQ's GEMM format, vLLM's quantization="awq"): 4-bit weights with a zero point and a scale
per group of G input channels, multiplied by the Triton dequant-GEMM of pagedlab.kernels (its torch reference
on the CPU). The format is described in kernels/reference.py (awq_dequantize_ref)."""
from __future__ import annotations

import torch

from pagedlab.config import ConfigError
from pagedlab.kernels import awq_gemm
from pagedlab.kernels.reference import AWQ_PACK_FACTOR
from pagedlab.layers.quantization.base import QuantizationConfig, QuantMethod, new_parameter


class AWQLinearMethod(QuantMethod):
    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(self, layer, in_features, out_sizes, dtype):
        if in_features % self.group_size or any(size % AWQ_PACK_FACTOR for size in out_sizes):
            raise ValueError(f"AWQ needs input features divisible by the group size {self.group_size} and output "
                             f"features divisible by {AWQ_PACK_FACTOR}; this layer has {in_features} -> {out_sizes}")
        groups, packed = in_features // self.group_size, sum(out_sizes) // AWQ_PACK_FACTOR
        layer.qweight = new_parameter((in_features, packed), torch.int32, output_dim=1, pack_factor=AWQ_PACK_FACTOR)
        layer.qzeros = new_parameter((groups, packed), torch.int32, output_dim=1, pack_factor=AWQ_PACK_FACTOR)
        layer.scales = new_parameter((groups, sum(out_sizes)), dtype, output_dim=1)

    def apply(self, layer, x):
        out = awq_gemm(x, layer.qweight, layer.scales, layer.qzeros, self.group_size)
        return out if layer.bias is None else out + layer.bias


class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    @classmethod
    def from_checkpoint(cls, quantization_config: dict) -> "AWQConfig":
        """From config.json's quantization_config: 4 bits, GEMM layout, zero points (what AutoAWQ writes)."""
        bits, group_size = quantization_config.get("bits"), quantization_config.get("group_size")
        version, zero_point = quantization_config.get("version", "gemm").lower(), quantization_config.get("zero_point")
        if bits != 4 or version != "gemm" or not zero_point:
            raise ConfigError(f"AWQ checkpoints load with 4 bits, version 'gemm' and zero points; this one has "
                              f"bits={bits}, version={version!r}, zero_point={zero_point}")
        if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
            raise ConfigError(f"AWQ group_size must be a power of two >= 16 (AutoAWQ writes 32, 64 or 128), "
                              f"got {group_size!r}")
        return cls(group_size)

    def supported_dtypes(self, device: torch.device) -> tuple[torch.dtype, ...]:
        # as in vLLM, AWQ runs in half precision on the GPU; the CPU reference also takes float32 (tests)
        return (torch.float16,) if device.type == "cuda" else (torch.float16, torch.float32)

    def get_quant_method(self) -> QuantMethod:
        return AWQLinearMethod(self.group_size)
