"""Small per-step tensors of host values (sampling parameters, row indexes) on the device, without waiting.

torch.tensor(values, device="cuda") copies from pageable memory and waits for the stream: with async scheduling
that is the step just launched, so the host would sit idle until the device finished it. Through pinned memory the
copy is queued behind the step's kernels instead, as ModelRunner.prepare's inputs are.
"""
from __future__ import annotations

import torch


def staged(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
