"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks each token's top-k experts, the fused-MoE kernel
runs them all at once.

Tensor parallelism shards every expert like the dense MLP: each rank holds the same columns of every expert's
gate and up projections and the matching rows of its down projection; the partial outputs are all-reduced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedlab.config import ConfigError
from pagedlab.distributed.communication import tensor_parallel_all_reduce
from pagedlab.distributed.parallel_state import get_tensor_parallel_rank, get_tensor_parallel_world_size
from pagedlab.kernels import fused_moe


class FusedMoE(nn.Module):
    """renormalize: the top-k probabilities are rescaled to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob).
    round_weights: the routing weights are rounded to the model dtype before use, as Qwen3-MoE does."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 round_weights: bool = False) -> None:
        super().__init__()
        world_size = get_tensor_parallel_world_size()
        if intermediate_size % world_size:
            raise ConfigError(f"tensor_parallel_size={world_size} must divide the experts' intermediate size "
                              f"({intermediate_size})")
        self.num_experts, self.top_k, self.renormalize, self.round_weights = (num_experts, top_k, renormalize,
                                                                               round_weights)
        self.intermediate = intermediate_size // world_size      # this rank's
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)      # the router, replicated
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> None:
        """shard (expert, part): part 0 gate [I, H] or 1 up into w13, "down" [H, I] into w2; expert None: the
        tensor holds every expert (transformers' fused [E, 2I, H] gate_up or [E, H, I] down)."""
        expert, part = shard
        local, start = self.intermediate, get_tensor_parallel_rank() * self.intermediate
        if expert is None:
            for e in range(self.num_experts):
                if part == "down":
                    self.weight_loader(param, tensor[e], (e, "down"))
                else:
                    gate, up = tensor[e].chunk(2, dim=0)
                    self.weight_loader(param, gate, (e, 0))
                    self.weight_loader(param, up, (e, 1))
            return
        if part == "down":
            expected, target = (param.shape[1], local * get_tensor_parallel_world_size()), param.data[expert]
            piece = tensor[:, start:start + local]
        else:
            expected, target = (local * get_tensor_parallel_world_size(), param.shape[2]), \
                param.data[expert, part * local:(part + 1) * local]
            piece = tensor[start:start + local]
        if tuple(tensor.shape) != expected:
            raise ValueError(f"expert {expert}: checkpoint shape {tuple(tensor.shape)}, expected {expected}")
        target.copy_(piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(x.dtype)
        return tensor_parallel_all_reduce(fused_moe(x, self.w13, self.w2, weights, ids))
