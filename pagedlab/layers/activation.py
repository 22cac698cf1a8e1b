import torch
import torch.nn.functional as F
from torch import nn

from pagedlab.layers import fused_ops

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SiluAndMul(nn.Module):
    """SwiGLU on a merged gate/up projection: silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops.use_fused(x):
            return fused_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
