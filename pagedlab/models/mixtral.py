"""Mixtral and Qwen3-MoE: Llama's (Qwen3's) attention with a mixture of experts for the MLP.

Mixtral routes every token to its top-2 of 8 experts and renormalizes their probabilities; Qwen3-MoE renormalizes
only with norm_topk_prob, and keeps dense MLPs in its mlp_only_layers (and off its decoder_sparse_step). Both
checkpoint layouts load: one tensor per expert (Mixtral's w1/w3/w2, Qwen3-MoE's gate/up/down_proj) and
transformers' fused per-layer experts.gate_up_proj / experts.down_proj.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from pagedlab.layers.fused_moe import FusedMoE
from pagedlab.models.llama import LlamaForCausalLM, LlamaMLP

# checkpoint expert projection -> w13 part (gate 0, up 1) or the down projection
EXPERT_PARTS = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": "down", "down_proj": "down"}
PER_EXPERT = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(\w+)\.weight$")
FUSED_EXPERTS = re.compile(r"(.*\.mlp)\.experts\.(gate_up_proj|down_proj)$")


class MixtureOfExpertsForCausalLM(LlamaForCausalLM):
    """MixtralForCausalLM and Qwen3MoeForCausalLM."""

    def make_mlp(self, layer_index: int) -> nn.Module:
        config = self.config
        if config.model_type == "mixtral":
            return FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                            config.intermediate_size, renormalize=True)
        sparse = (layer_index not in (getattr(config, "mlp_only_layers", None) or [])
                  and config.num_experts > 0 and (layer_index + 1) % config.decoder_sparse_step == 0)
        if not sparse:
            return LlamaMLP(config, self.quant_config)
        return FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                        config.moe_intermediate_size, renormalize=config.norm_topk_prob, round_weights=True)

    def rename(self, name: str, tensor: torch.Tensor):
        name = name.replace(".block_sparse_moe.", ".mlp.")      # Mixtral's name for the layer's MoE
        if match := PER_EXPERT.match(name):
            prefix, expert, projection = match.groups()
            part = EXPERT_PARTS[projection]
            return f"{prefix}.{'w2' if part == 'down' else 'w13'}", tensor, (int(expert), part)
        if match := FUSED_EXPERTS.match(name):
            prefix, projection = match.groups()
            if projection == "down_proj":
                return f"{prefix}.w2", tensor, (None, "down")
            return f"{prefix}.w13", tensor, (None, "gate_up")
        return super().rename(name, tensor)
