"""Megatron-style tensor-parallel layers. With one rank each is the plain layer it extends.

- ColumnParallelLinear: output features split across ranks; each rank computes its slice of every merged
  projection (q/k/v, gate/up), no communication. QKVParallelLinear splits by heads.
- RowParallelLinear: input features split; each rank's partial product is summed by an all-reduce.
- VocabParallelEmbedding / ParallelLMHead: vocabulary rows split; the lookup is all-reduced, the logits gathered
  to rank 0, which samples.

Every rank loads only its part: the weight loaders cut the checkpoint tensor before the quantization method sees
it, along the parameter's output dim (column) or the other one (row), so fp8 and AWQ layers shard the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedlab.config import ConfigError
from pagedlab.distributed.communication import gather_to_first_rank, tensor_parallel_all_reduce
from pagedlab.distributed.parallel_state import get_tensor_parallel_rank, get_tensor_parallel_world_size
from pagedlab.layers.linear import MergedLinear
from pagedlab.layers.quantization import QuantizationConfig


def check_heads_divide(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    """Query heads split evenly; KV heads split evenly too, or, with more ranks than KV heads, each KV head is
    replicated on world_size / num_kv_heads ranks."""
    if num_heads % world_size:
        raise ConfigError(f"tensor_parallel_size={world_size} must divide the number of attention heads "
                          f"({num_heads})")
    if num_kv_heads % world_size and world_size % num_kv_heads:
        raise ConfigError(f"tensor_parallel_size={world_size} must divide the number of KV heads ({num_kv_heads}) "
                          "or be a multiple of it (each KV head then replicated on several ranks)")


class ColumnParallelLinear(MergedLinear):
    """out_sizes: one projection's output features, or several merged ones'. Shard i of the checkpoint is cut into
    slices[i] parts (default: one per rank); with fewer parts than ranks, consecutive ranks share a part."""

    def __init__(self, in_features: int, out_sizes: int | list[int], bias: bool,
                 quant_config: QuantizationConfig | None = None, slices: list[int] | None = None) -> None:
        full_sizes = [out_sizes] if isinstance(out_sizes, int) else list(out_sizes)
        world_size = get_tensor_parallel_world_size()
        slices = slices or [world_size] * len(full_sizes)
        if any(size % parts for size, parts in zip(full_sizes, slices)):
            raise ConfigError(f"tensor_parallel_size={world_size} must divide the output features {full_sizes} "
                              "of a column-parallel layer")
        super().__init__(in_features, [size // parts for size, parts in zip(full_sizes, slices)], bias, quant_config)
        self.full_sizes, self.slices = full_sizes, slices

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None = None) -> None:
        dim, pack = param.output_dim, param.pack_factor
        if shard is None and len(self.full_sizes) > 1:     # one checkpoint tensor holding every shard (GPT-2 c_attn)
            if tensor.shape[dim] * pack != sum(self.full_sizes):
                raise ValueError(f"checkpoint shape {tuple(tensor.shape)} does not hold {self.full_sizes} outputs")
            for index, part in enumerate(tensor.split([size // pack for size in self.full_sizes], dim)):
                self.weight_loader(param, part, index)
            return
        index = shard or 0
        if tensor.shape[dim] * pack != self.full_sizes[index]:
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, expected {self.full_sizes[index]} outputs "
                             f"along dim {dim}")
        parts = self.slices[index]
        size = tensor.shape[dim] // parts
        part = get_tensor_parallel_rank() * parts // get_tensor_parallel_world_size()
        super().weight_loader(param, tensor.narrow(dim, part * size, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v of num_heads / num_kv_heads heads, split by heads; num_heads and num_kv_heads are this rank's."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 quant_config: QuantizationConfig | None = None) -> None:
        world_size = get_tensor_parallel_world_size()
        check_heads_divide(num_heads, num_kv_heads, world_size)
        kv_slices = min(num_kv_heads, world_size)
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, quant_config, slices=[world_size, kv_slices, kv_slices])
        self.num_heads, self.num_kv_heads = num_heads // world_size, num_kv_heads // kv_slices


class RowParallelLinear(MergedLinear):
    """The bias is loaded on rank 0 only (zeros elsewhere), so the all-reduce adds it once."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 quant_config: QuantizationConfig | None = None) -> None:
        world_size = get_tensor_parallel_world_size()
        if in_features % world_size:
            raise ConfigError(f"tensor_parallel_size={world_size} must divide the input features ({in_features}) "
                              "of a row-parallel layer")
        super().__init__(in_features // world_size, [out_features], bias, quant_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tensor_parallel_all_reduce(super().forward(x))

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None = None) -> None:
        rank, world_size = get_tensor_parallel_rank(), get_tensor_parallel_world_size()
        if param.dim() == 1:
            tensor = tensor if rank == 0 else torch.zeros_like(tensor)
        else:
            input_dim = 1 - param.output_dim     # AWQ: qzeros/scales hold groups of inputs, cut the same way
            size = param.shape[input_dim]
            if tensor.shape[input_dim] != size * world_size:
                raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, expected {size * world_size} along "
                                 f"dim {input_dim}")
            tensor = tensor.narrow(input_dim, rank * size, size)
        super().weight_loader(param, tensor, shard)


class VocabParallelEmbedding(nn.Module):
    """Rank r holds the rows of token ids [r * rows, (r + 1) * rows), the vocabulary padded to a multiple of the
    world size; a rank looks up the ids it holds, zeros the others, and the all-reduce assembles the result."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.rows_per_rank = -(-num_embeddings // get_tensor_parallel_world_size())
        self.vocab_start = get_tensor_parallel_rank() * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None = None) -> None:
        if tensor.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, model shape "
                             f"{(self.num_embeddings, self.embedding_dim)}")
        rows = tensor[self.vocab_start:self.vocab_start + self.rows_per_rank]
        param.data[:len(rows)].copy_(rows)
        param.data[len(rows):].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tensor_parallel_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        hidden = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight).masked_fill(elsewhere[:, None], 0)
        return tensor_parallel_all_reduce(hidden)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection over the same split (so it can share the embedding's weight): hidden -> logits over the
    whole vocabulary on rank 0, None on the other ranks."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = gather_to_first_rank(F.linear(hidden, self.weight))
        return None if logits is None else logits[:, :self.num_embeddings]
