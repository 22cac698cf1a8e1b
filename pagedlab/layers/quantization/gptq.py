"""GPTQ checkpoints (AutoGPTQ's 4-bit format, vLLM's quantization="gptq"), multiplied by the same Triton dequant-GEMM
as AWQ: a 4-bit weight with a zero point and a scale per group of input rows is the same computation in a
different packing. As the checkpoint loads, each qweight (packed along its input rows) is repacked along its
output columns in AWQ's order, and each qzeros (stored as zero - 1) gets its 1 back, so the layers are AWQ layers
from there on: they shard, and compute, the same. The format is described in kernels/reference.py
(gptq_dequantize_ref). Act-order checkpoints (desc_act: groups in an order other than the rows') are refused.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from pagedlab.config import ConfigError
from pagedlab.kernels.reference import AWQ_PACK_FACTOR, AWQ_PACK_ORDER, gptq_unpack_columns_ref, gptq_unpack_rows_ref
from pagedlab.layers.quantization.awq import AWQConfig


def pack_awq_columns(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] of 4-bit values -> int32 [R, C / 8] in AWQ's layout (nibble i holds column AWQ_PACK_ORDER[i])."""
    values = values.to(torch.int32).reshape(values.shape[0], -1, AWQ_PACK_FACTOR)
    packed = torch.zeros(values.shape[:2], dtype=torch.int32)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        packed |= values[:, :, column] << (4 * nibble)
    return packed


class GPTQConfig(AWQConfig):
    name = "gptq"

    @classmethod
    def from_checkpoint(cls, quantization_config: dict) -> "GPTQConfig":
        bits, group_size = quantization_config.get("bits"), quantization_config.get("group_size")
        checkpoint_format = quantization_config.get("checkpoint_format", "gptq")
        if bits != 4 or checkpoint_format != "gptq":
            raise ConfigError(f"GPTQ checkpoints load with 4 bits in checkpoint_format 'gptq'; this one has "
                              f"bits={bits}, checkpoint_format={checkpoint_format!r}")
        if quantization_config.get("desc_act"):
            raise ConfigError("GPTQ act-order checkpoints (desc_act=true) are not supported: their groups do not "
                              "follow the input rows; quantize with desc_act=false")
        if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
            raise ConfigError(f"GPTQ group_size must be a power of two >= 16 (32, 64 or 128 are usual), "
                              f"got {group_size!r}")
        return cls(group_size)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.endswith(".qweight"):
                yield name, pack_awq_columns(gptq_unpack_rows_ref(tensor))
            elif name.endswith(".qzeros"):
                yield name, pack_awq_columns(gptq_unpack_columns_ref(tensor) + 1)
            elif name.endswith(".g_idx"):
                expected = torch.arange(len(tensor)) // self.group_size
                if not torch.equal(tensor.long(), expected):
                    raise ValueError(f"{name}: the groups are not the rows' in order (an act-order checkpoint); "
                                     "pagedlab loads desc_act=false GPTQ checkpoints")
            else:
                yield name, tensor
