"""The GPU panel: what NVML (nvidia-ml-py) says about the card, beside the engine's own memory figures."""
from __future__ import annotations

import html

MiB, GiB = 2**20, 2**30


def gpu_status(index: int = 0) -> dict:
    """NVML's view of one GPU: name, memory used / total, utilization and the processes on it; or, where there
    is no NVIDIA GPU (or driver), {"available": False, "reason": ...}."""
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML: {exc}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        processes = [{"pid": p.pid, "memory": p.usedGpuMemory}
                     for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        return {"available": True, "name": pynvml.nvmlDeviceGetName(handle), "memory_used": memory.used,
                "memory_total": memory.total, "gpu_utilization": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                "processes": processes}
    finally:
        pynvml.nvmlShutdown()


def _gib(num_bytes: int | None) -> str:
    return "? GiB" if num_bytes is None else f"{num_bytes / GiB:.2f} GiB"


def gpu_panel_html(status: dict, memory: dict | None = None) -> str:
    if status["available"]:
        used, total = status["memory_used"] / GiB, status["memory_total"] / GiB
        processes = "".join(f"<li>pid {p['pid']}: {_gib(p['memory'])}</li>" for p in status["processes"]) \
            or "<li>none visible</li>"
        lines = [f"<b>{html.escape(str(status['name']))}</b>",
                 f"memory {used:.1f} / {total:.1f} GiB ({used / total:.0%}), utilization {status['gpu_utilization']}%",
                 f"processes:<ul style='margin:0'>{processes}</ul>"]
    else:
        lines = [f"<b>No NVIDIA GPU here</b> ({html.escape(status['reason'])}); the engine's own figures instead."]
    if memory is not None:
        kv = memory["num_blocks"] * memory["bytes_per_block"]
        lines.append(f"KV cache on {memory['device']}: {memory['num_blocks']:,} blocks x "
                     f"{memory['bytes_per_block']:,} B = {kv / MiB:,.1f} MiB, {memory['blocks_taken']:,} blocks "
                     f"taken ({memory['blocks_taken'] / max(memory['num_blocks'], 1):.0%})")
    return "<br>".join(lines)
