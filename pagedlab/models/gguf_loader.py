"""GGUF checkpoints (llama.cpp's single-file format), read with the `gguf` package as vLLM reads them.

The config and the tokenizer (with its chat template) come from the file's metadata through transformers
(`from_pretrained(dir, gguf_file=name)`). Tensors are dequantized one at a time to the engine's dtype as they
load, and renamed to the Hugging Face names the models' `load_weights` take: the map is gguf's own
`TensorNameMap`, applied to the parameter names of the transformers model (built on the meta device, so it costs
no memory). llama.cpp stores Llama's q/k projections with their rotary halves interleaved; they are permuted back.
"""
from __future__ import annotations

import copy
import functools
import os
from typing import Iterator

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from pagedlab.config import ConfigError

# transformers' model_type -> gguf's architecture name, where they differ
GGUF_ARCH_NAMES = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}
PERMUTED_QK_ARCHS = ("llama",)     # llama.cpp's converter interleaves q/k rotary halves for these


def is_gguf(model: str | None) -> bool:
    return bool(model) and model.endswith(".gguf") and os.path.isfile(model)


@functools.lru_cache(maxsize=1)
def _reader(path: str):
    """The file memory-mapped, its metadata parsed (seconds for a 49k-token vocabulary): opened once."""
    from gguf import GGUFReader
    return GGUFReader(path)


def readable_types() -> list[str]:
    """The tensor types the gguf package dequantizes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits
    return sorted(["F32", "F16"] + [t.name for t in _type_traits if isinstance(t, GGMLQuantizationType)])


def check_readable(path: str) -> None:
    """Refuse a file with a tensor type the gguf package cannot dequantize, before anything is built."""
    readable = set(readable_types())
    unreadable = {}
    for tensor in _reader(path).tensors:
        if tensor.tensor_type.name not in readable:
            unreadable.setdefault(tensor.tensor_type.name, tensor.name)
    if unreadable:
        found = ", ".join(f"{kind} (e.g. {name})" for kind, name in sorted(unreadable.items()))
        raise ConfigError(f"{path}: GGUF tensor type(s) {found} cannot be dequantized by the gguf package; "
                          f"readable types: {', '.join(readable_types())}. Re-quantize the file to one of them "
                          "(llama.cpp's llama-quantize) or load the original checkpoint")


def load_gguf_config(path: str) -> PretrainedConfig:
    return copy.deepcopy(_load_gguf_config(os.path.abspath(path), os.path.getmtime(path)))


@functools.lru_cache(maxsize=4)
def _load_gguf_config(path: str, mtime: float) -> PretrainedConfig:
    check_readable(path)
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if getattr(config, "dtype", None) is None:
        config.dtype = torch.bfloat16     # dtype "auto" on a GPU: the weights are quantized, bf16 holds them
    return config


def load_gguf_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))


def _gguf_to_hf_names(hf_config: PretrainedConfig) -> dict[str, str]:
    """gguf tensor name -> HF parameter name, through gguf's TensorNameMap for the config's architecture."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_name = GGUF_ARCH_NAMES.get(hf_config.model_type, hf_config.model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == arch_name), None)
    if arch is None:
        raise ConfigError(f"the gguf package knows no architecture {arch_name!r} (model_type "
                          f"{hf_config.model_type!r})")
    name_map = get_tensor_name_map(arch, hf_config.num_hidden_layers)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    names = {}
    for hf_name in hf_model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of a q/k projection [heads * head_dim, hidden]."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def iterate_gguf_weights(path: str, hf_config: PretrainedConfig, dtype: torch.dtype
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor in dtype) for every tensor of the file, dequantized one at a time."""
    from gguf.quants import dequantize

    names = _gguf_to_hf_names(hf_config)
    permuted = hf_config.model_type in PERMUTED_QK_ARCHS
    for tensor in _reader(path).tensors:
        if tensor.name not in names:
            if tensor.name.startswith("rope_"):     # precomputed rope factors: derived from the config instead
                continue
            raise ValueError(f"{path}: GGUF tensor {tensor.name!r} matches no parameter of a "
                             f"{hf_config.model_type} model")
        name = names[tensor.name]
        weight = dequantize(tensor.data, tensor.tensor_type)
        if permuted and name.endswith("q_proj.weight"):
            weight = _unpermute_qk(weight, hf_config.num_attention_heads)
        elif permuted and name.endswith("k_proj.weight"):
            weight = _unpermute_qk(weight, hf_config.num_key_value_heads)
        yield name, torch.from_numpy(np.array(weight)).to(dtype)     # a copy: F32 tensors are read-only views
