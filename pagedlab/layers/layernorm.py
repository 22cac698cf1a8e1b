import torch
from torch import nn

from pagedlab.layers import fused_ops


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, in float32 like transformers. With `residual`: adds it first, returns (out, sum)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if fused_ops.use_fused(x) and self.weight.dtype == x.dtype:     # one kernel on the GPU, same rounding
            return fused_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = residual = x + residual
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)
