import torch
from torch import nn


class MergedLinear(nn.Linear):
    """Projections of one input stacked along the output dim (q/k/v, gate/up): one GEMM instead of several.

    Checkpoints store them separately; `weight_loader(param, tensor, shard)` copies shard i into its rows.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes) + 1)]
        for param in self.parameters():
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard: int) -> None:
        rows = param.data[self.offsets[shard]:self.offsets[shard + 1]]
        if rows.shape != tensor.shape:
            raise ValueError(f"shard {shard} has shape {tuple(tensor.shape)}, expected {tuple(rows.shape)}")
        rows.copy_(tensor)
