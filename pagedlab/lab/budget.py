"""How many KV blocks a GPU holds: the engine's startup arithmetic, on paper, for any card and model shape.

    kv_cache = total x gpu_memory_utilization - weights - peak activations - memory outside torch
    blocks   = kv_cache // bytes_per_block,   bytes_per_block = block_size x kv_bytes_per_token

The engine measures the last two terms with a profiling forward pass (executor/model_runner.py); here they are
estimates you can change. The report has the keys of the runner's, so `kv_budget_line` prints either.
"""
from __future__ import annotations

from dataclasses import replace

from pagedlab.sim.cost_model import MODEL_SHAPES, ModelShape
from pagedlab.sim.profiles import shipped_profiles
from pagedlab.sim.simulator import SimConfig

GiB = 2**30
CARDS = {"L4": 24, "A100-40GB": 40, "H100": 80, "H200": 141}     # name: memory in GiB, as the lab rounds it


def kv_shape(model: str, kv_cache_dtype: str = "auto") -> ModelShape:
    """The model shape with the KV cache's element size: fp8 stores one byte where bf16 stores two."""
    shape = MODEL_SHAPES[model]
    return replace(shape, dtype_bytes=1) if kv_cache_dtype.startswith("fp8") else shape


def card_kv_budget(model: str = "llama-3-8b", card_gib: float = 80.0, gpu_memory_utilization: float = 0.9,
                   block_size: int = 16, kv_cache_dtype: str = "auto", peak_activation_gib: float = 1.0,
                   non_torch_gib: float = 0.5, swap_space: float = 4.0) -> dict:
    """The KV budget of `model` (a MODEL_SHAPES name, bf16 weights) on a card of `card_gib` GiB."""
    total = card_gib * GiB
    weights = MODEL_SHAPES[model].weight_bytes
    peak_activation, non_torch = peak_activation_gib * GiB, non_torch_gib * GiB
    kv_cache = int(total * gpu_memory_utilization - weights - peak_activation - non_torch)
    bytes_per_block = kv_shape(model, kv_cache_dtype).kv_bytes_per_token * block_size
    return {"device": card_name(card_gib), "model": model, "block_size": block_size, "kv_cache_dtype": kv_cache_dtype,
            "total": total,
            "gpu_memory_utilization": gpu_memory_utilization, "weights": weights,
            "peak_activation": peak_activation, "non_torch": non_torch, "kv_cache": kv_cache,
            "bytes_per_block": bytes_per_block, "num_gpu_blocks": max(kv_cache // bytes_per_block, 0),
            "num_gpu_blocks_override": None, "num_cpu_blocks": int(swap_space * GiB) // bytes_per_block}


def sim_config_for(report: dict, **changes) -> SimConfig:
    """A simulator config whose KV cache is the one `card_kv_budget` computed, timed by the card's measured
    profile where one is shipped (see `cost_model_note`)."""
    tokens = report["num_gpu_blocks"] * report["block_size"]
    changes.setdefault("profile", card_profile(report["total"] / GiB, report["model"]))
    return SimConfig(model=report["model"], block_size=report["block_size"], kv_tokens=tokens, kv_gib=None,
                     **changes)


def card_name(card_gib: float) -> str:
    return next((name for name, gib in CARDS.items() if gib == card_gib), f"{card_gib:g} GiB card")


def card_profile(card_gib: float, model: str) -> str | None:
    """The shipped GPU profile ("h200-llama-3.2-1b") of this card and model shape, if one was measured."""
    name = f"{card_name(card_gib).lower()}-{model}"
    return name if name in shipped_profiles() else None


def cost_model_note(card_gib: float, model: str) -> str:
    """Where the simulator's step times come from for this card and model shape."""
    profile = card_profile(card_gib, model)
    if profile is not None:
        return f"Times from the profile {profile}: step times measured on the {card_name(card_gib)}."
    return (f"Times are estimated: the generic roofline cost model (no measured profile for {model} on "
            f"{card_name(card_gib)}; shipped: {', '.join(shipped_profiles()) or 'none'}).")
