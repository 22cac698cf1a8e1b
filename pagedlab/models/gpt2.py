"""GPT-2: learned positions, fused c_attn, pre-LayerNorm, gelu_new; checkpoints store Conv1D ([in, out]) weights."""
from typing import Iterable

import torch
from torch import nn

from pagedlab.layers.activation import get_activation
from pagedlab.layers.attention import PagedAttention
from pagedlab.layers.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding)
from pagedlab.layers.quantization import QuantizationConfig
from pagedlab.models.utils import load_params

CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.hidden_size, num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = self.hidden_size // num_heads
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        # c_attn's checkpoint tensor stacks q, k and v: its weight loader splits them, then shards each by heads
        self.c_attn = QKVParallelLinear(self.hidden_size, self.head_dim, num_heads, num_heads, True, quant_config)
        self.c_proj = RowParallelLinear(self.hidden_size, self.hidden_size, True, quant_config)
        self.num_heads = self.c_attn.num_heads      # this rank's
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = (x.view(-1, self.num_heads, self.head_dim) for x in self.c_attn(hidden).chunk(3, dim=-1))
        return self.c_proj(self.attn(q, k, v).flatten(1))


class GPT2MLP(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, True, quant_config)
        self.act = get_activation(config.activation_function)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, True, quant_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx, quant_config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, quant_config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden))
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i, quant_config) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden = block(hidden)
        return self.ln_f(hidden)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.transformer = GPT2Model(config, quant_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = config.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:     # None on ranks > 0
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed():
            for name, tensor in weights:
                if name.endswith((".attn.bias", ".attn.masked_bias")):     # causal-mask buffers of old checkpoints
                    continue
                if self.tie_word_embeddings and name == "lm_head.weight":
                    continue
                if not name.startswith("transformer."):     # openai-community/gpt2 holds the bare GPT2Model
                    name = "transformer." + name
                if name.endswith(".weight") and name.split(".")[-2] in CONV1D_MODULES:
                    tensor = tensor.t()
                yield name, tensor, None
        load_params(self, renamed())
