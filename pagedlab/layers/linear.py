"""The linear layer whose weights are stored and multiplied the way a quantization config says.

Model code builds every decoder projection from `MergedLinear` (through the tensor-parallel layers of
parallel.py) with the model's quant_config (None: unquantized); the config picks the layer's QuantMethod, which
creates its parameters and computes its output. Checkpoint tensors reach the parameters through `weight_loader`,
so a method may transform them as they load (fp8 quantizes each shard on arrival) or take pre-quantized tensors
of its own names (AWQ's qweight/qzeros/scales).
"""
from __future__ import annotations

import torch
from torch import nn

from pagedlab.layers.quantization.base import QuantizationConfig, UnquantizedLinearMethod, new_parameter


class MergedLinear(nn.Module):
    """Projections of one input stacked along the output dim (q/k/v, gate/up): one GEMM instead of several.

    Checkpoints store them separately; `weight_loader(param, tensor, shard)` loads shard i into its part of the
    output dim (shard None: the whole parameter).
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, sum(out_sizes)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes) + 1)]
        self.quant_method = quant_config.get_quant_method() if quant_config else UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, out_sizes, torch.get_default_dtype())
        self.bias = new_parameter((self.out_features,), torch.get_default_dtype(), output_dim=0) if bias else None
        for param in self.parameters():
            param.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None = None) -> None:
        start, end = (0, self.out_features) if shard is None else self.offsets[shard:shard + 2]
        self.quant_method.load_weight(self, param, tensor, start, end)
