"""The real engine, live: it steps in a background thread on a steady stream of requests, every step's
statistics arrive through its event bus, and a dashboard redraws them while it runs. Plus a GPU panel (NVML).

Only the engine thread touches the engine; the dashboard reads the rows it leaves behind. Widgets are updated by
setting their values (safe from any thread), never by printing into an Output from a background thread.
"""
from __future__ import annotations

import bisect
import gc
import html
import itertools
import random
import threading
import time

import ipywidgets as widgets
import pandas as pd

from pagedlab import events as ev
from pagedlab.config import ConfigError
from pagedlab.engine.llm import build_engine
from pagedlab.lab.models import lab_model_dir
from pagedlab.lab.views import figure_png, live_figure
from pagedlab.sampling_params import SamplingParams
from pagedlab.sim.workloads import make_trace

MiB, GiB = 2**20, 2**30


def request_stream(workload: str, max_model_len: int, vocab_size: int, seed: int = 0):
    """Endless (prompt token ids, SamplingParams) pairs with a workload's lengths, scaled from its 2048-token
    traces down to max_model_len; `ignore_eos` keeps each output at its drawn length."""
    rng = random.Random(seed)
    scale = min(1.0, max_model_len / 2048)
    for r in itertools.cycle(make_trace(workload, 1000, seed)):
        prompt_len = max(1, round(r.prompt_len * scale))
        output_len = max(1, min(round(r.output_len * scale), max_model_len - prompt_len))
        prompt = [rng.randrange(4, vocab_size) for _ in range(prompt_len)]
        yield prompt, SamplingParams(n=r.n, temperature=0.8, max_tokens=output_len, ignore_eos=True,
                                     seed=rng.randrange(2**31))


def _release_device_memory() -> None:
    """Free the previous engine's KV cache before the next engine measures what is free. The engine sits in
    reference cycles (its scheduler calls back into it), so only the cycle collector frees it."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LiveEngine:
    """Runs `build_engine(model, **engine_kwargs)` in a background thread, keeping `backlog` requests waiting so it
    is always busy. `rows` gets one dict per step (StepStats + memory accounting + wall seconds); `marks` one
    (seconds, label) per (re)start. Both survive restarts, so before and after a change can be compared."""

    def __init__(self, model: str | None = None, workload: str = "sharegpt", backlog: int = 64) -> None:
        self.model = model or lab_model_dir()
        self.workload = workload
        self.backlog = backlog
        self.rows: list[dict] = []
        self.marks: list[tuple[float, str]] = []
        self.engine = None
        self.error: str | None = None
        self._origin = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def seconds(self) -> float:
        return time.monotonic() - self._origin

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, run_seconds: float = 60.0, label: str = "", **engine_kwargs) -> None:
        """Stop the current engine, build a new one with `engine_kwargs`, run it for `run_seconds`.
        Raises ConfigError (with the engine's message) when the settings cannot work."""
        self.stop()
        self.engine = None
        _release_device_memory()
        engine = build_engine(self.model, **engine_kwargs)
        engine.report_unfinished = False
        engine.bus.subscribe(lambda event: self._on_event(engine, event))
        self.engine, self.error = engine, None
        self.marks.append((self.seconds(), label or f"block {engine.kv.block_size}, {engine.kv.num_blocks} blocks"))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(engine, run_seconds), daemon=True)
        self._thread.start()

    def _run(self, engine, run_seconds: float) -> None:
        vocab_size = engine.executor.hf_config.vocab_size
        requests = request_stream(self.workload, engine.config.scheduler.max_model_len, vocab_size)
        deadline = time.monotonic() + run_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                while len(engine.scheduler.waiting) < self.backlog:
                    prompt, params = next(requests)
                    engine.add_request({"prompt_token_ids": prompt}, params)
                engine.step()
        except Exception as exc:  # noqa: BLE001 - shown on the dashboard instead of dying silently in a thread
            self.error = f"{type(exc).__name__}: {exc}"

    def _on_event(self, engine, event: ev.Event) -> None:
        if event.kind == ev.STEP:
            stats = event.data["stats"]
            usage = engine.memory_usage().as_dict()
            self.rows.append({**vars(stats), "kv_usage": stats.kv_usage, "wall": self.seconds(),
                              "run": len(self.marks) - 1,
                              **{f"mem_{k}": v for k, v in usage.items()}})

    def frame(self, last_seconds: float | None = None) -> pd.DataFrame:
        """The rows so far (or of the last `last_seconds`) as a DataFrame."""
        rows = list(self.rows)
        if last_seconds is not None and rows:
            rows = rows[bisect.bisect_left(rows, rows[-1]["wall"] - last_seconds, key=lambda row: row["wall"]):]
        return pd.DataFrame(rows)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        self._stop.set()
        self.wait()


# --- the GPU panel ----------------------------------------------------------------------------------------------
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


def engine_memory(engine) -> dict:
    """The engine's own memory figures: KV blocks, their size, and how many are taken now."""
    return {"device": engine.kv_budget["device"], "num_blocks": engine.kv.num_blocks,
            "block_size": engine.kv.block_size, "bytes_per_block": engine.bytes_per_block,
            "blocks_taken": engine.kv.num_blocks - engine.kv.num_free_blocks}


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


# --- the dashboard ----------------------------------------------------------------------------------------------
class LiveDashboard:
    """Controls for the live engine and its plots. A change restarts the engine with the new settings and a dashed
    line marks it on the plots, so the throughput before and after sit side by side. On a GPU the memory control
    is gpu_memory_utilization; on the CPU it is the KV cache's size (cpu_kv_cache_space), its CPU counterpart."""

    def __init__(self, model: str | None = None, run_seconds: float = 60.0, refresh_seconds: float = 1.0,
                 workload: str = "sharegpt", block_size: int = 16, max_model_len: int = 256,
                 kv_cache_mib: float = 4.0, gpu_memory_utilization: float = 0.9, history_seconds: float = 120.0):
        import torch

        self.live = LiveEngine(model, workload)
        self.run_seconds, self.refresh_seconds, self.history_seconds = run_seconds, refresh_seconds, history_seconds
        self.max_model_len = max_model_len
        self.on_gpu = torch.cuda.is_available()
        style, wide = {"description_width": "initial"}, widgets.Layout(width="400px")
        self.block_size = widgets.SelectionSlider(options=[4, 8, 16, 32, 64], value=block_size,
                                                  description="block_size", continuous_update=False, style=style,
                                                  layout=wide)
        if self.on_gpu:
            self.memory = widgets.FloatSlider(value=gpu_memory_utilization, min=0.1, max=0.95, step=0.05,
                                              description="gpu_memory_utilization", continuous_update=False,
                                              style=style, layout=wide)
        else:
            self.memory = widgets.FloatSlider(value=kv_cache_mib, min=1, max=32, step=1,
                                              description="KV cache (MiB)", continuous_update=False, style=style,
                                              layout=wide)
        self.preemption_mode = widgets.ToggleButtons(options=["recompute", "swap"], description="preemption",
                                                     style=style)
        self.plot = widgets.Image(format="png")
        self.status = widgets.HTML()
        self.gpu = widgets.HTML()
        for control in (self.block_size, self.memory, self.preemption_mode):
            control.observe(self.restart, names="value")
        self.widget = widgets.VBox([widgets.HBox([self.block_size, self.memory]), self.preemption_mode, self.status,
                                    self.plot, self.gpu])
        self._closed = threading.Event()
        self._drawn = None
        self.restart()
        threading.Thread(target=self._refresh_loop, daemon=True).start()

    def engine_kwargs(self) -> dict:
        kwargs = dict(block_size=self.block_size.value, max_model_len=self.max_model_len,
                      preemption_mode=self.preemption_mode.value, swap_space=0.25)
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = self.memory.value
        else:
            # Short steps keep a CPU's plot smooth: a long prefill would stall every decode for a second.
            kwargs.update(cpu_kv_cache_space=self.memory.value / 1024, max_num_batched_tokens=1024)
        return kwargs

    def restart(self, change=None) -> None:
        kwargs = self.engine_kwargs()
        try:
            self.live.start(self.run_seconds, label=f"block {kwargs['block_size']}, {self.memory.description} "
                                                    f"{self.memory.value:g}", **kwargs)
        except ConfigError as exc:
            self.status.value = f"<span style='color:#b71c1c'>ConfigError: {html.escape(str(exc))}</span>"
            return
        self.status.value = f"running for {self.run_seconds:g} s: {html.escape(repr(kwargs))}"

    def figure(self):
        return live_figure(self.live.frame(self.history_seconds), self.live.marks)

    def draw(self) -> None:
        self.plot.value = figure_png(self.figure())
        engine = self.live.engine
        self.gpu.value = gpu_panel_html(gpu_status(), engine_memory(engine) if engine is not None else None)
        if self.live.error:
            self.status.value = f"<span style='color:#b71c1c'>engine stopped: {html.escape(self.live.error)}</span>"
        elif not self.live.running and engine is not None:
            self.status.value = "finished; move a control to run again"

    def _refresh_loop(self) -> None:
        while not self._closed.wait(self.refresh_seconds):
            drawn = (len(self.live.rows), len(self.live.marks), self.live.running)
            if drawn != self._drawn:
                self._drawn = drawn
                self.draw()

    def wait(self) -> None:
        """Block until the current run ends, then draw its last state."""
        self.live.wait()
        self.draw()

    def stop(self) -> None:
        self.live.stop()
        self._closed.set()
        self.draw()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
