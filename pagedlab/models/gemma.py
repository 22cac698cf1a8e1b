"""Gemma 2 and Gemma 3 (text): sliding-window layers mixed with global ones, embeddings scaled by sqrt(hidden),
RMSNorm with (1 + weight) around both attention and MLP (pre and post), scores scaled by query_pre_attn_scalar
instead of head_dim, GeGLU. Gemma 2 soft-caps attention scores and the final logits; Gemma 3 normalizes each head's
q and k and gives local and global layers their own rope (rope_parameters per layer type).
"""
from typing import Iterable

import torch
from torch import nn

from pagedlab.layers.activation import get_activation
from pagedlab.layers.attention import PagedAttention
from pagedlab.layers.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding)
from pagedlab.layers.quantization import QuantizationConfig
from pagedlab.layers.rotary_embedding import RotaryEmbedding, rope_parameters
from pagedlab.models.llama import PACKED_MODULES, head_dim
from pagedlab.models.utils import fused_parameter, layer_sliding_windows, load_params


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32 and rounded once at the end (Llama rounds before the weight)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def layer_rope_parameters(config, layer_type: str) -> dict:
    """Gemma 3 keeps one rope per layer type ({"sliding_attention": {...}, "full_attention": {...}})."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:
        params = dict(params[layer_type])
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        return params
    return rope_parameters(config)


class GemmaAttention(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, sliding_window: int | None,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.head_dim = head_dim(config)
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias, quant_config)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads     # this rank's
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias,
                                        quant_config)
        self.rotary_emb = rotary_emb
        self.qk_norm = config.model_type in ("gemma3", "gemma3_text")
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   config.query_pre_attn_scalar ** -0.5, sliding_window,
                                   getattr(config, "attn_logit_softcapping", None))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim)).flatten(1))


class GemmaMLP(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, False,
                                                 quant_config)
        self.act = get_activation(config.hidden_activation)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, False, quant_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, sliding_window: int | None,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config, rotary_emb, sliding_window, quant_config)
        self.mlp = GemmaMLP(config, quant_config)
        norm = lambda: GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(hidden)))
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class GemmaModel(nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # sqrt(hidden) rounded to the model dtype (through float32), as transformers does
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5, dtype=torch.float32).to(
            torch.get_default_dtype()), persistent=False)
        windows = layer_sliding_windows(config)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        ropes = {kind: RotaryEmbedding(head_dim(config), config.max_position_embeddings,
                                       layer_rope_parameters(config, kind)) for kind in set(layer_types)}
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, ropes[kind], window, quant_config)
                                    for kind, window in zip(layer_types, windows))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.embed_scale
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


class GemmaForCausalLM(nn.Module):
    """Gemma2ForCausalLM and Gemma3ForCausalLM (the text model)."""

    def __init__(self, config, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma with use_bidirectional_attention (an encoder) is not supported: pagedlab "
                             "decodes causally")
        self.model = GemmaModel(config, quant_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:     # None on ranks > 0
        logits = self.lm_head(hidden)
        if logits is not None and self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed():
            for name, tensor in weights:
                if self.tie_word_embeddings and name == "lm_head.weight":
                    continue
                param_name, shard = fused_parameter(name, PACKED_MODULES)
                yield param_name, tensor, shard
        load_params(self, renamed())
