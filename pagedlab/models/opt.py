"""OPT (facebook/opt-*): learned positions offset by 2, pre- or post-LayerNorm, optional embedding projections."""
from typing import Iterable

import torch
from torch import nn

from pagedlab.layers.activation import get_activation
from pagedlab.layers.attention import PagedAttention
from pagedlab.layers.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding)
from pagedlab.layers.quantization import QuantizationConfig
from pagedlab.models.utils import fused_parameter, load_params

POSITION_OFFSET = 2    # OPT's position table reserves its first two rows
PACKED_MODULES = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}


class OPTAttention(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.hidden_size, num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = self.hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(self.hidden_size, self.head_dim, num_heads, num_heads, config.enable_bias,
                                          quant_config)
        self.out_proj = RowParallelLinear(self.hidden_size, self.hidden_size, config.enable_bias, quant_config)
        self.num_heads = self.qkv_proj.num_heads        # this rank's
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = (x.view(-1, self.num_heads, self.head_dim) for x in self.qkv_proj(hidden).chunk(3, dim=-1))
        return self.out_proj(self.attn(q, k, v).flatten(1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        affine = config.layer_norm_elementwise_affine
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, quant_config)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_dim, config.enable_bias, quant_config)
        self.act = get_activation(config.activation_function)
        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, config.enable_bias, quant_config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self._residual(hidden, self.self_attn_layer_norm, self.self_attn)
        return self._residual(hidden, self.final_layer_norm, lambda x: self.fc2(self.act(self.fc1(x))))

    def _residual(self, hidden, norm, block):
        if self.pre_norm:
            return hidden + block(norm(hidden))
        return norm(hidden + block(hidden))


class OPTDecoder(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        projected = config.word_embed_proj_dim != config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False) if projected else None
        self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False) if projected else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, quant_config) for _ in range(config.num_hidden_layers))
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = nn.LayerNorm(
            config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine) if has_final_norm else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden = layer(hidden)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config, quant_config)


class OPTForCausalLM(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.model = OPTModel(config, quant_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim)
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:     # None on ranks > 0
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed():
            for name, tensor in weights:
                if self.tie_word_embeddings and name == "lm_head.weight":
                    continue
                if name.startswith("decoder."):     # facebook/opt-* checkpoints hold the bare OPTModel
                    name = "model." + name
                param_name, shard = fused_parameter(name, PACKED_MODULES)
                yield param_name, tensor, shard
        load_params(self, renamed())
