"""The seam between linear layers and quantization: a QuantizationConfig hands each Linear a QuantMethod, which
creates the layer's parameters, loads checkpoint tensors into them and computes the layer's output."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from pagedlab.config import ConfigError


def new_parameter(shape: tuple[int, ...], dtype: torch.dtype, output_dim: int, pack_factor: int = 1) -> nn.Parameter:
    """A parameter that knows which of its dims holds the output features, and how many share an element."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.output_dim, param.pack_factor = output_dim, pack_factor
    return param


def output_slice(param: nn.Parameter, start: int, end: int) -> torch.Tensor:
    """The part of param that holds output features [start, end)."""
    return param.data.narrow(param.output_dim, start // param.pack_factor, (end - start) // param.pack_factor)


class QuantMethod(ABC):
    """How a Linear stores its weight and multiplies by it. The layer creates its bias itself (in the model's
    dtype); the method adds it."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, out_sizes: list[int], dtype: torch.dtype) -> None:
        """Register the layer's weight parameters (and buffers), each made by new_parameter."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, in_features] -> [T, out_features] in x's dtype."""

    def load_weight(self, layer: nn.Module, param: nn.Parameter, tensor: torch.Tensor, start: int, end: int) -> None:
        """Copy a checkpoint tensor into the part of param holding output features [start, end)."""
        target = output_slice(param, start, end)
        if target.shape != tensor.shape:
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, model shape {tuple(target.shape)}")
        target.copy_(tensor)


class UnquantizedLinearMethod(QuantMethod):
    def create_weights(self, layer, in_features, out_sizes, dtype):
        layer.weight = new_parameter((sum(out_sizes), in_features), dtype, output_dim=0)

    def apply(self, layer, x):
        return F.linear(x, layer.weight, layer.bias)


class QuantizationConfig(ABC):
    """One quantization scheme (vLLM's name): the dtypes it runs in and the method every Linear gets."""

    name: str

    def supported_dtypes(self, device: torch.device) -> tuple[torch.dtype, ...]:
        return torch.float32, torch.float16, torch.bfloat16

    def check_dtype(self, dtype: torch.dtype, device: torch.device) -> None:
        supported = self.supported_dtypes(device)
        if dtype not in supported:
            names = " or ".join(str(d).removeprefix("torch.") for d in supported)
            raise ConfigError(f"quantization={self.name!r} runs in {names} on {device.type}, not "
                              f"{str(dtype).removeprefix('torch.')}: pass dtype=\"{names.split()[0]}\"")

    def checkpoint_tensors(self, weights):
        """The checkpoint's (name, tensor) pairs as the layers' parameters take them (GPTQ repacks its own)."""
        return weights

    @abstractmethod
    def get_quant_method(self) -> QuantMethod:
        """The method of one Linear layer of the decoder (embeddings and the LM head stay unquantized)."""
