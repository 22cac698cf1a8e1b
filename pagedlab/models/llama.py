"""Llama 2/3 (GQA, llama3 rope scaling), Mistral (sliding window), Qwen2 (qkv bias, tied embeddings), Qwen3
(RMSNorm over each head's q and k) and Phi-3 (fused qkv and gate_up checkpoints, longrope, partial rotary): one
config-driven model. Sliding windows apply per layer, as the config says.
"""
from typing import Iterable

import torch
from torch import nn

from pagedlab.layers.activation import SiluAndMul
from pagedlab.layers.attention import PagedAttention
from pagedlab.layers.layernorm import RMSNorm
from pagedlab.layers.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding)
from pagedlab.layers.quantization import QuantizationConfig
from pagedlab.layers.rotary_embedding import RotaryEmbedding, rope_parameters
from pagedlab.models.utils import fused_parameter, layer_sliding_windows, load_params

# checkpoint projection -> (merged parameter, shard)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, quant_config: QuantizationConfig | None,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim(config)
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, qkv_bias, quant_config)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads     # this rank's
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        getattr(config, "attention_bias", False), quant_config)
        self.rotary_emb = rotary_emb
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                                   sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias,
                                                 quant_config)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, quant_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, quant_config: QuantizationConfig | None,
                 sliding_window: int | None, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, quant_config, sliding_window)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """make_mlp(layer_index) builds each layer's MLP (a mixture of experts in mixtral.py)."""

    def __init__(self, config, quant_config: QuantizationConfig | None, make_mlp) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # one cos/sin table shared by every layer (Llama 3.1's 128k positions would cost 32 MB a layer)
        rotary_emb = RotaryEmbedding(head_dim(config), config.max_position_embeddings, rope_parameters(config))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary_emb, quant_config, window, make_mlp(i))
                                    for i, window in enumerate(layer_sliding_windows(config)))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config, self.quant_config = config, quant_config
        self.model = LlamaModel(config, quant_config, self.make_mlp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_mlp(self, layer_index: int) -> nn.Module:
        return LlamaMLP(self.config, self.quant_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:     # None on ranks > 0
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_params(self, (renamed for name, tensor in weights if (renamed := self.rename(name, tensor))))

    def rename(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor, object] | None:
        """A checkpoint tensor -> (parameter name, tensor, shard), or None to skip it."""
        if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        param_name, shard = fused_parameter(name, PACKED_MODULES)     # Phi-3's fused tensors load as they are
        return param_name, tensor, shard
