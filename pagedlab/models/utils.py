from typing import Iterable

import torch
from torch import nn


def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor, int | None]]) -> None:
    """Copy (parameter name, tensor, shard) triples into `model`, through the parameter's `weight_loader` where it
    has one (linear layers: shards, quantization). Every parameter must be covered and every tensor must have a
    parameter."""
    params = dict(model.named_parameters())
    missing = set(params)
    for name, tensor, shard in weights:
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
        param = params[name]
        if hasattr(param, "weight_loader"):
            try:
                param.weight_loader(param, tensor, shard)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        elif param.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model shape {tuple(param.shape)}")
        else:
            param.data.copy_(tensor)
        missing.discard(name)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} parameter(s) of {type(model).__name__}: {sorted(missing)}")


def layer_sliding_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers applies them: the layers that
    `layer_types` marks "sliding_attention" (Qwen2/3, Gemma 2/3), or every layer where a config has a window but no
    layer types (Mistral)."""
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return [None] * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * num_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def fused_parameter(name: str, packed: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    """(parameter name, shard) of a checkpoint tensor: separate q/k/v (or gate/up) tensors load as shards of one fused
    parameter, as `packed` maps them; any other tensor loads as it is (shard None)."""
    module = name.split(".")[-2]
    if module in packed:
        merged, shard = packed[module]
        return name.replace(f".{module}.", f".{merged}."), shard
    return name, None
