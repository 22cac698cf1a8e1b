"""Load a model: an HF-format directory (config, weights in safetensors, else pytorch .bin) or a GGUF file
(gguf_loader.py); its dtype, device and weights."""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from pagedlab.layers.quantization import get_quantization_config
from pagedlab.models.gguf_loader import is_gguf, iterate_gguf_weights, load_gguf_config
from pagedlab.models.registry import get_model_class

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def load_hf_config(model: str) -> PretrainedConfig:
    if is_gguf(model):
        return load_gguf_config(model)
    if not model or not os.path.isdir(model):
        raise FileNotFoundError(f"model {model!r} does not exist (pass a local HF-format directory or a .gguf file)")
    return AutoConfig.from_pretrained(model)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """A dtype name, or for "auto" the checkpoint's dtype on CUDA (float32 if it names none) and float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    return getattr(torch, config_dtype) if isinstance(config_dtype, str) else config_dtype


def model_max_length(hf_config: PretrainedConfig) -> int:
    """The longest context the model supports: its positions. A sliding window does not cap it: the paged
    kernels apply each layer's window."""
    return getattr(hf_config, "max_position_embeddings", None) or hf_config.n_positions


def eos_token_ids(model_dir: str, hf_config: PretrainedConfig) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (Llama 3 instruct lists several there)."""
    sources = [hf_config]
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        sources.append(GenerationConfig.from_pretrained(model_dir))
    ids = []
    for source in sources:
        eos = getattr(source, "eos_token_id", None)
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return tuple(dict.fromkeys(ids))


def _weight_files(model_dir: str) -> tuple[list[str], str]:
    for pattern, index_name, kind in (("*.safetensors", "model.safetensors.index.json", "safetensors"),
                                      ("pytorch_model*.bin", "pytorch_model.bin.index.json", "bin")):
        index = os.path.join(model_dir, index_name)
        if os.path.isfile(index):   # the index names the shards (other *.safetensors may hold another format)
            with open(index) as f:
                return sorted({os.path.join(model_dir, name) for name in json.load(f)["weight_map"].values()}), kind
        files = sorted(glob.glob(os.path.join(model_dir, pattern)))
        if files:
            return files, kind
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {model_dir}")


def iterate_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    files, kind = _weight_files(model_dir)
    for path in files:
        if kind == "safetensors":
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def load_model(model: str, hf_config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
               quantization: str | None = None) -> nn.Module:
    """Build the registered model class directly on `device` in `dtype`, its linear layers quantized as
    `quantization` and the checkpoint's config say, then copy the checkpoint in."""
    model_class = get_model_class(hf_config)
    quant_config = get_quantization_config(quantization, hf_config)
    if quant_config is not None:
        quant_config.check_dtype(dtype, device)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = model_class(hf_config, quant_config)
    finally:
        torch.set_default_dtype(default_dtype)
    module.load_weights(iterate_gguf_weights(model, hf_config, dtype) if is_gguf(model) else iterate_weights(model))
    return module.eval().requires_grad_(False)
