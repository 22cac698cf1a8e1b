"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import functools

import torch
from triton.runtime import interpreter

from .reference import FP8_DTYPE

H100_SMS = 132


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of device; the interpreter (CPU) plans for an H100."""
    if device.type != "cuda":
        return H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def device_arch(device: torch.device) -> int:
    """Compute capability as major * 10 + minor (90: Hopper); 0 for the interpreter (CPU)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for dtype, following torch's own setting for fp32 matmuls: full fp32 ("ieee") by
    default, tf32 once torch.set_float32_matmul_precision("high") (or "medium") allows it. Triton's default is
    tf32, whose 10-bit mantissa makes fp32 runs disagree with torch's fp32 at about 1e-3."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def scale_pointer(scale, cache: torch.Tensor) -> torch.Tensor:
    """An fp8 scale as a 1-element float32 tensor on the cache's device, for the kernel to load.

    Passing a pointer rather than a number means a scale that lives on the GPU is never read back to the
    host (no synchronization, CUDA-graph safe). Caches that are not fp8 never load it: any pointer will do.
    """
    if cache.dtype != FP8_DTYPE:
        return cache
    if isinstance(scale, torch.Tensor):
        return scale.to(device=cache.device, dtype=torch.float32).reshape(1)
    return torch.full((1,), 1.0 if scale is None else float(scale), dtype=torch.float32, device=cache.device)


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with int(array of shape [1]), which
    NumPy >= 2.4 rejects, so every loop with a run-time bound fails under TRITON_INTERPRET=1
    (triton-lang/triton#9171). Apply the upstream fix: squeeze to 0-d first. No effect on GPU runs."""
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:  # a Triton whose interpreter is organized differently
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_patch_interpreter_for_numpy_2_4()
