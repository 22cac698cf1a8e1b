"""The live dashboard: controls for the live engine and its plots, redrawn each second by a refresh loop that
lives as long as the dashboard (stopping or restarting the engine leaves it running). A change restarts the
engine with the new settings; each run gets its colour, its full setting and its steady tokens/s in the legend,
and a pinned run stays drawn over the newest one for comparison.

The engine steps in a process of its own (lab/live.py): this one receives its step reports and draws. Widgets are
updated by setting their values, never by printing into an Output from a background thread; nothing here blocks
the kernel.
"""
from __future__ import annotations

import asyncio
import html
import math
import threading
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pagedlab.config import ConfigError
from pagedlab.lab.gpu import GiB, MiB, gpu_panel_html, gpu_status
from pagedlab.lab.live import ChatTurn, LiveEngine
from pagedlab.lab.models import kv_bytes_per_token, model_label
from pagedlab.lab.views import figure_png

RUN_COLORS = ("#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#00838f", "#ad1457", "#5d4037", "#9e9d24")
QUEUES = {"num_running_seqs": ("running seqs", "#2e7d32"), "num_waiting": ("waiting", "#9e9e9e"),
          "num_swapped": ("swapped", "#6a1b9a")}
MAX_POINTS = 2000               # per run and line


def sliding_rate(seconds: np.ndarray, counts: np.ndarray, window: float) -> np.ndarray:
    """Counts per second over the last `window` seconds at each point; NaN while less than half a window has
    passed (a run's first steps, the batch's prefills finishing together, would read as a spike)."""
    total = np.cumsum(counts)
    before = np.searchsorted(seconds, seconds - window)
    span = seconds - seconds[before]
    rate = (total - total[before]) / np.maximum(span, 1e-9)
    return np.where(span >= window / 2, rate, np.nan)


def steady_rate(seconds: np.ndarray, tokens: np.ndarray, warmup: float = 0.25) -> float:
    """Tokens per second of a run after its first `warmup` share of time (the batch filling up)."""
    if len(seconds) < 2:
        return float("nan")
    start = seconds[0] + warmup * (seconds[-1] - seconds[0])
    after = seconds >= start
    return float(tokens[after][1:].sum() / max(seconds[-1] - seconds[after][0], 1e-9))


def run_summaries(frame: pd.DataFrame, marks: list[tuple[float, str]]) -> list[dict]:
    """One dict per run that has steps: its number, label, start, steady rate and rate curve."""
    out = []
    for run, rows in (frame.groupby("run") if len(frame) else ()):
        t, tokens = rows["wall"].to_numpy(), rows["num_generated_tokens"].to_numpy()
        start, label = marks[run]
        out.append({"run": run + 1, "label": label, "start": start, "steady": steady_rate(t, tokens), "rows": rows})
    return out


def live_figure(frame: pd.DataFrame, marks: list[tuple[float, str]] = (), window: float = 2.0,
                pinned: dict | None = None, gpu: pd.DataFrame | None = None, last_seconds: float | None = None
                ) -> Figure:
    """A live engine's steps: tokens/s (over a sliding `window` seconds), sequences running, waiting and swapped,
    KV cache use, and the GPU as NVML sees it. Each run (a restart with new settings) starts at a dashed line;
    the legend gives its full setting and steady rate. `pinned` (a run summary) is drawn over the newest run,
    shifted to start with it."""
    fig = Figure(figsize=(11, 7.0), layout="constrained")
    (rate_ax, seq_ax), (kv_ax, gpu_ax) = fig.subplots(2, 2)
    runs = run_summaries(frame, list(marks))
    handles = []
    for first, summary in zip([True] + [False] * len(runs), runs):
        rows, color = summary["rows"], RUN_COLORS[(summary["run"] - 1) % len(RUN_COLORS)]
        t = rows["wall"].to_numpy()
        rate = sliding_rate(t, rows["num_generated_tokens"].to_numpy(), window)
        every = max(1, len(rows) // MAX_POINTS)       # a GPU steps thousands of times a run: draw a sample
        rows, t, rate = rows.iloc[::every], t[::every], rate[::every]
        line, = rate_ax.plot(t, rate, color=color,
                             label=f"run {summary['run']}: {summary['label']}: {summary['steady']:,.0f} tok/s steady")
        handles.append(line)
        for column, (label, queue_color) in QUEUES.items():
            seq_ax.plot(t, rows[column], color=queue_color, label=label if first else None)
        kv_ax.plot(t, 100 * rows["kv_usage"], color="#c62828", label="blocks taken" if first else None)
        kv_ax.plot(t, 100 * rows["mem_tokens"] / rows["mem_capacity"], color="#2e7d32",
                   label="slots holding tokens" if first else None)
    if pinned is not None and runs:
        t = pinned["rows"]["wall"].to_numpy()
        rate = sliding_rate(t, pinned["rows"]["num_generated_tokens"].to_numpy(), window)
        every = max(1, len(t) // MAX_POINTS)
        line, = rate_ax.plot((t - pinned["start"] + runs[-1]["start"])[::every], rate[::every],
                             color="black", ls=":", lw=1.5,
                             label=f"pinned run {pinned['run']}, drawn from the newest run's start: "
                                   f"{pinned['label']}: {pinned['steady']:,.0f} tok/s steady")
        handles.append(line)
    for ax in (rate_ax, seq_ax, kv_ax, gpu_ax):
        for number, (at, _) in enumerate(marks, start=1):
            ax.axvline(at, color="black", ls="--", lw=0.8)
            if ax is rate_ax:
                ax.annotate(f"run {number}", (at, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                            textcoords="offset points", va="top", fontsize="small",
                            bbox={"boxstyle": "round", "fc": "white", "ec": "none", "alpha": 0.8})
        ax.set_xlabel("seconds since the dashboard started")
    if len(frame):
        end = frame["wall"].iloc[-1]
        start = min(frame["wall"].iloc[0], marks[0][0])
        for ax in (rate_ax, seq_ax, kv_ax, gpu_ax):
            ax.set_xlim(max(start, end - last_seconds) if last_seconds else start, end + 0.5)
        seq_ax.legend(fontsize="small", loc="upper left")
        kv_ax.legend(fontsize="small", loc="lower left")
    rate_ax.set(ylabel=f"output tokens / s (last {window:g} s)", title="throughput")
    rate_ax.set_ylim(bottom=0)
    seq_ax.set(ylabel="sequences", title="scheduler queues")
    kv_ax.set(ylabel="% of the KV cache", title="KV cache", ylim=(0, 105))
    _gpu_panel(gpu_ax, gpu)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", fontsize="small", ncols=1)
    return fig


def _gpu_panel(ax, gpu: pd.DataFrame | None) -> None:
    if gpu is None or not len(gpu):
        ax.set_title("GPU (NVML)")
        ax.text(0.5, 0.5, "no NVIDIA GPU here:\nthe KV panel shows the engine's own memory", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_yticks([])
        return
    ax.plot(gpu["wall"], gpu["memory_used"] / GiB, color="#37474f", label="memory used")
    ax.set(ylabel="GiB", title=f"GPU (NVML): {gpu['name'].iloc[-1]}",
           ylim=(0, gpu["memory_total"].iloc[-1] / GiB * 1.05))
    busy = ax.twinx()
    busy.plot(gpu["wall"], gpu["gpu_utilization"], color="#ef6c00", lw=0.9, label="utilization")
    busy.set(ylabel="utilization %", ylim=(0, 105))
    ax.legend(handles=[Line2D([], [], color="#37474f", label="memory used (GiB)"),
                       Line2D([], [], color="#ef6c00", label="utilization (%)")], fontsize="small", loc="lower left")


def chat_html(turn: ChatTurn | None) -> str:
    """A chat turn: the message, the answer so far, and its blocks as cells filling up."""
    if turn is None:
        return "<i>No message yet.</i>"
    block_size = turn.block_size
    cells = "".join(
        f"<span title='block {block}: {filled} of {block_size} slots' style='display:inline-block;width:34px;"
        f"margin:1px;border:1px solid #1565c0;font-size:10px;text-align:center;background:linear-gradient("
        f"to right,#90caf9 {100 * filled / block_size:.0f}%,white 0)'>{block}</span>" for block, filled in turn.blocks)
    tokens = sum(filled for _, filled in turn.blocks)
    return (f"<b>you:</b> {html.escape(turn.message)}<br><b>model</b> ({html.escape(turn.status)}"
            f"{', ' + html.escape(turn.error) if turn.error else ''}): {html.escape(turn.answer) or '…'}<br>"
            f"{len(turn.blocks)} blocks of {block_size} slots hold its {tokens} tokens ({turn.prompt_tokens} prompt); "
            f"each cell is a physical block, filled in blue:<br>{cells}")


class LiveDashboard:
    """Controls for the live engine and its plots. On a GPU the memory control is gpu_memory_utilization; on the
    CPU it is the KV cache's size (cpu_kv_cache_space), its CPU counterpart, by default room for 8 requests of
    max_model_len. `chat_box` lets a learner send a
    message into the running batch and watch its blocks fill."""

    def __init__(self, model: str | None = None, run_seconds: float = 60.0, refresh_seconds: float = 1.0,
                 workload: str = "sharegpt", block_size: int = 16, max_model_len: int = 256,
                 kv_cache_mib: float | None = None, gpu_memory_utilization: float = 0.9, history_seconds: float = 120.0):
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
            self.memory = widgets.FloatSlider(value=gpu_memory_utilization, min=0.05, max=0.95, step=0.05,
                                              description="gpu_memory_utilization", continuous_update=False,
                                              style=style, layout=wide)
        else:
            # The range follows the model: from one max_model_len request up to 32 of them.
            one = kv_bytes_per_token(self.live.model) * max_model_len / MiB
            self.memory = widgets.FloatSlider(value=kv_cache_mib or round(8 * one), min=math.ceil(one),
                                              max=round(32 * one), step=max(1, round(one / 2)),
                                              description="KV cache (MiB)", continuous_update=False, style=style,
                                              layout=wide)
        self.memory.add_class("pagedlab-main-control")
        self.preemption_mode = widgets.ToggleButtons(options=["recompute", "swap"], description="preemption",
                                                     style=style)
        buttons = {"stop": self.stop, "run again": self.restart, "pin the newest run": self.pin,
                   "clear the pin": self.unpin}
        self.buttons = {name: widgets.Button(description=name) for name in buttons}
        for name, action in buttons.items():
            self.buttons[name].on_click(lambda _, action=action: action())
        self.plot = widgets.Image(format="png")
        self.plot.add_class("pagedlab-main-figure")
        self.status, self.gpu = widgets.HTML(), widgets.HTML()
        self.pinned: dict | None = None
        self.gpu_samples: list[dict] = []
        for control in (self.block_size, self.memory, self.preemption_mode):
            control.observe(self.restart, names="value")
        self.widget = widgets.VBox([widgets.HBox([self.block_size, self.memory]), self.preemption_mode,
                                    widgets.HBox(list(self.buttons.values())), self.status, self.plot, self.gpu])
        self.message = widgets.Text(placeholder="type a message, press Enter", layout=widgets.Layout(width="600px"),
                                    description="message", continuous_update=False)
        self.message.observe(lambda change: self.send(change["new"]), names="value")
        self.chat = widgets.HTML(chat_html(None))
        self.chat_box = widgets.VBox([widgets.HTML(f"model: <code>{html.escape(model_label(self.live.model))}"
                                                   "</code>"), self.message, self.chat])
        self._closed = threading.Event()
        self._drawn = None
        self._kernel_thread = threading.current_thread()
        try:
            self._kernel_loop = asyncio.get_running_loop()     # inside a kernel, its event loop
        except RuntimeError:
            self._kernel_loop = None
        self.restart()
        self._loop = threading.Thread(target=self._refresh_loop, daemon=True)
        self._loop.start()

    def engine_kwargs(self) -> dict:
        kwargs = dict(block_size=self.block_size.value, max_model_len=self.max_model_len,
                      preemption_mode=self.preemption_mode.value, swap_space=0.25)
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = round(self.memory.value, 2)
        else:
            # Short steps keep a CPU's plot smooth: a long prefill would stall every decode for a second.
            kwargs.update(cpu_kv_cache_space=self.memory.value / 1024, max_num_batched_tokens=1024)
        return kwargs

    def setting_label(self) -> str:
        memory = (f"gpu_memory_utilization {self.memory.value:.2f}" if self.on_gpu
                  else f"KV cache {self.memory.value:g} MiB")
        return (f"block_size {self.block_size.value}, {memory}, {self.preemption_mode.value}, "
                f"max_model_len {self.max_model_len}")

    def restart(self, change=None) -> None:
        kwargs = self.engine_kwargs()
        try:
            self.live.start(self.run_seconds, label=self.setting_label(), **kwargs)
        except ConfigError as exc:
            self.status.value = f"<span style='color:#b71c1c'>ConfigError: {html.escape(str(exc))}</span>"
            return
        info = self.live.info
        self.status.value = (f"run {len(self.live.marks)} for {self.run_seconds:g} s: {html.escape(self.setting_label())}"
                             f" ({info['num_blocks']:,} blocks of {info['bytes_per_block'] / MiB:.3g} MiB)")

    def stop(self) -> None:
        """Stop the engine; the plots stay, and a control or "run again" starts it anew."""
        self.live.stop()
        self.status.value = "stopped; move a control or press 'run again'"

    def pin(self) -> None:
        runs = run_summaries(self.live.frame(), self.live.marks)
        if runs:
            self.pinned = runs[-1]
            self._drawn = None

    def unpin(self) -> None:
        self.pinned, self._drawn = None, None

    def send(self, message: str) -> None:
        if message.strip() and self.live.running:
            self.live.send(message.strip())
            self.message.value = ""
        elif message.strip():
            self.chat.value = "<i>The engine is not running: press 'run again' first.</i>"

    def gpu_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.gpu_samples)

    def figure(self) -> Figure:
        return live_figure(self.live.frame(), self.live.marks, pinned=self.pinned, gpu=self.gpu_frame(),
                           last_seconds=self.history_seconds)

    def draw(self) -> None:
        """Render the plots and panels and hand them to the widgets (in the kernel's thread when there is one)."""
        status = gpu_status()
        if status["available"]:
            self.gpu_samples.append({"wall": self.live.seconds(), **{k: status[k] for k in (
                "name", "memory_used", "memory_total", "gpu_utilization")}})
        updates = {self.plot: figure_png(self.figure()),
                   self.gpu: gpu_panel_html(status, self.live.engine_memory())}
        if self.live.chats:
            updates[self.chat] = chat_html(self.live.chats[-1])
        if self.live.error:
            updates[self.status] = (f"<span style='color:#b71c1c'>engine stopped: {html.escape(self.live.error)}"
                                    "</span>")
        elif self.live.finished and not self.status.value.startswith("stopped"):
            updates[self.status] = "finished; move a control or press 'run again'"
        self._publish(updates)

    def _publish(self, updates: dict) -> None:
        """Set widget values. From the refresh thread inside a kernel, the kernel's event loop does it: ipykernel 7
        routes messages sent from other threads unreliably (a cell's reply can be lost, and Run All hangs)."""
        def apply() -> None:
            for widget, value in updates.items():
                widget.value = value
        if self._kernel_loop is not None and threading.current_thread() is not self._kernel_thread:
            self._kernel_loop.call_soon_threadsafe(apply)
        else:
            apply()

    def _refresh_loop(self) -> None:
        while not self._closed.wait(self.refresh_seconds):
            chat = self.live.chats[-1] if self.live.chats else None
            drawn = (len(self.live.rows), len(self.live.marks), self.live.running, id(self.pinned),
                     chat and (len(chat.answer), chat.status))
            if drawn != self._drawn or (self.on_gpu and self.live.running):
                self._drawn = drawn
                try:
                    self.draw()
                except Exception as exc:  # noqa: BLE001 - a failed redraw is shown; the loop goes on
                    self.status.value = f"<span style='color:#b71c1c'>redraw failed: {html.escape(repr(exc))}</span>"

    def close(self) -> None:
        """Stop the refresh loop and the engine's core process for good."""
        self._closed.set()
        self._loop.join()
        self.live.close()

    def save_figures(self, directory: str | Path, stem: str) -> list[Path]:
        """The live figure as PNG and the GPU panel as HTML, for a record of a run."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        png, panel = directory / f"{stem}.png", directory / f"{stem}_gpu_panel.html"
        self.figure().savefig(png, dpi=110, bbox_inches="tight")
        panel.write_text(self.gpu.value)
        return [png, panel]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
