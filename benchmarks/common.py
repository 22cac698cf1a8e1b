"""What every GPU benchmark script here shares."""
from __future__ import annotations

import time
import traceback

import torch


def run_section(results: dict, name: str, fn):
    """Run one section: its result, or its error and traceback, goes into results[name]; the script goes on."""
    start = time.perf_counter()
    try:
        results[name] = fn()
        status = "ok"
    except Exception as e:
        results[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        status = f"FAILED ({type(e).__name__}: {str(e)[:200]})"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"[{name}] {status} in {time.perf_counter() - start:.1f} s", flush=True)
    return results[name]
