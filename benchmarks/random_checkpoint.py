"""A random-weight Llama checkpoint written tensor by tensor, for shapes no single card (or host buffer) holds whole:
the Llama-3-70B shape is 131 GiB of bf16. The model is built on the meta device for its parameter names and shapes
only; each tensor is drawn on the GPU when there is one, copied out and written into safetensors shards of at most
`shard_gib`, with the index transformers and pagedlab read.

    PYTHONPATH=. python benchmarks/random_checkpoint.py --shape llama-3-70b --out /tmp/llama-3-70b
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

from pagedlab.entrypoints.bench import PAD_ID, SHAPES

INIT_STD = 0.02     # LlamaConfig's initializer_range


def write_random_checkpoint(shape: str, directory: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            shard_gib: float = 4.0) -> str:
    spec = SHAPES[shape]
    config = LlamaConfig(**spec, pad_token_id=PAD_ID, dtype=dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(seed)
    os.makedirs(directory, exist_ok=True)
    tied = config.tie_word_embeddings
    weight_map, shard, shard_bytes, total_bytes = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    for name, param in model.named_parameters():
        if tied and name == "lm_head.weight":
            continue
        if "norm" in name:
            tensor = torch.ones(param.shape, dtype=dtype)
        else:
            tensor = torch.empty(param.shape, dtype=dtype, device=device).normal_(0, INIT_STD, generator=generator)
        shard[name] = tensor.cpu()
        shard_bytes += tensor.numel() * tensor.element_size()
        total_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= shard_gib * 2**30:
            flush()
    flush()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=1)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=spec["bos_token_id"], eos_token_id=spec["eos_token_id"],
                     pad_token_id=PAD_ID).save_pretrained(directory)
    return directory


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(write_random_checkpoint(args.shape, args.out, getattr(torch, args.dtype), args.seed))
