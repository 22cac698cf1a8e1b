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
