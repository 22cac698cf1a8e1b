"""Tiny random-weight HF checkpoints of every supported architecture, for tests that need a real model.

`tiny_model(arch)` (a session-scoped pytest fixture: import it into a test module) returns the directory of a
checkpoint built once per session; `build_tiny_checkpoint` writes one anywhere; `load_hf_model` loads the
transformers reference in float32. All share vocab 256, hidden 64, 2 layers (Gemma 3: 3), 4 heads (2 KV heads where
the architecture has GQA), bos 1 / eos 2 / pad 0, and 256 positions.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

_COMMON = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA_LIKE = dict(_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
_OPT = dict(_COMMON, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, word_embed_proj_dim=64, init_std=0.1)

# name -> (config class, model class, config kwargs)
TINY_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA_LIKE, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=32), rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=True)),
    # a sliding window shorter than the test prompts, on every layer
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, sliding_window=7)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA_LIKE, head_dim=32, tie_word_embeddings=True)),
    # fused qkv / gate_up checkpoints; longrope (the prompts stay below original_max_position_embeddings: short
    # factors, attention factor sqrt(1 + ln 4 / ln 64)); half of each head rotated
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        _LLAMA_LIKE, head_dim=16, original_max_position_embeddings=64, pad_token_id=0, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, original_max_position_embeddings=64,
            short_factor=[1.0, 1.3, 1.9, 2.6], long_factor=[1.5, 2.5, 4.0, 8.0]))),
    # 4 experts, top 2, renormalized
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        _LLAMA_LIKE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    # 6 experts, top 3, not renormalized; layer 1 keeps a dense MLP
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        _LLAMA_LIKE, head_dim=16, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=3,
        norm_topk_prob=False, mlp_only_layers=[1])),
    # local (window 6) and global layers alternating; soft-capped scores and logits; scores scaled by 1/sqrt(24)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _LLAMA_LIKE, head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh")),
    # 2 local layers (window 5, rope theta 10k) then a global one (theta 1M, linear scaling)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _LLAMA_LIKE, num_hidden_layers=3, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}})),
    "opt": ("OPTConfig", "OPTForCausalLM", _OPT),
    # opt-350m's shape: post-LayerNorm, embeddings projected from a narrower width
    "opt-proj": ("OPTConfig", "OPTForCausalLM", dict(_OPT, word_embed_proj_dim=32, do_layer_norm_before=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(_COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                                   initializer_range=0.1)),
}
ARCHITECTURES = tuple(TINY_MODELS)


def build_tiny_checkpoint(arch: str, directory: str, seed: int = 0, safetensors: bool = True) -> str:
    """Write a random-weight checkpoint of `arch` (a TINY_MODELS name) to `directory`; .bin if not safetensors."""
    config_name, model_name, kwargs = TINY_MODELS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(directory)
    if not safetensors:
        for path in Path(directory).glob("*.safetensors"):
            path.unlink()
        torch.save(model.state_dict(), f"{directory}/pytorch_model.bin")
    return directory


def load_hf_model(directory: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def hf_greedy(directory: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt in fp32, past EOS (like ignore_eos)."""
    model = load_hf_model(directory)
    model.generation_config.eos_token_id = None     # else generate() takes the checkpoint's EOS over ours
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        # eos_token_id=None: generate past EOS like ignore_eos (min_new_tokens would mask EOS instead)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0))
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch) -> directory of a tiny checkpoint of that architecture, built once per session."""
    built: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny_checkpoint(arch, str(tmp_path_factory.mktemp(arch)))
        return built[arch]
    return make
