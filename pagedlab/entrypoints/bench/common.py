"""What every part of the bench uses: a timestamped log, device synchronization, freeing GPU memory, percentiles."""
from __future__ import annotations

import gc
import time


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)




def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def percentiles(values: list[float]) -> dict:
    import numpy as np
    if not values:
        return {}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "count": int(a.size)}


def gib(b) -> float | None:
    return None if b is None else round(b / 2**30, 3)

