"""The model shapes the bench runs (random weights of a real model's shape, built with transformers and saved, so
every system runs the very same tensors) and the dimensions the roofline needs."""
from __future__ import annotations

_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
# transformers LlamaConfig kwargs of each shape ("tiny": a smoke test that runs on a CPU)
SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=128000, eos_token_id=128001),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                       rope_parameters=dict(rope_type="default", rope_theta=500000.0), tie_word_embeddings=False,
                       rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    # 131 GiB of bf16: no single card holds it (tensor_parallel_size 4 or 8); written by benchmarks/random_checkpoint.py
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                        rope_parameters=dict(rope_type="default", rope_theta=500000.0), tie_word_embeddings=False,
                        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0), tie_word_embeddings=False,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
}
PAD_ID = 0


def build_random_checkpoint(shape: str, directory: str, dtype, device, seed: int):
    """A random-weight Llama of `shape`, built on `device` in `dtype` and saved to `directory`; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    spec = SHAPES[shape]
    config = LlamaConfig(**spec, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to(device).eval().requires_grad_(False)
    model.generation_config = GenerationConfig(bos_token_id=spec["bos_token_id"], eos_token_id=spec["eos_token_id"],
                                               pad_token_id=PAD_ID)
    model.save_pretrained(directory)
    return model


def load_hf(directory: str, dtype, device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval().requires_grad_(False)


def model_dims(hf_config) -> dict:
    """Parameter counts and per-token KV bytes of a Llama-like config (what the roofline needs)."""
    h, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    hq, hkv = hf_config.num_attention_heads, hf_config.num_key_value_heads
    d = getattr(hf_config, "head_dim", None) or h // hq
    inter, vocab = hf_config.intermediate_size, hf_config.vocab_size
    per_layer = h * (hq * d + 2 * hkv * d) + hq * d * h + 3 * h * inter
    return {"layers": layers, "hidden": h, "num_heads": hq, "num_kv_heads": hkv, "head_dim": d,
            "intermediate": inter, "vocab": vocab, "layer_params": per_layer * layers, "lm_head_params": vocab * h,
            "embedding_params": vocab * h, "tied": bool(getattr(hf_config, "tie_word_embeddings", False))}

