"""The simulator playground: the engine's settings as widgets. Any change re-runs the simulator (well under a
second at 200 requests) on a GPU card of your choice and redraws the figures in place. Every run is kept in a
table, and a pinned run stays drawn beside the new ones, so settings can be compared.

The figures are PNGs set on Image widgets, as everywhere in the lab, never displayed into an `ipywidgets.Output`:
a headless runner (nbclient, so nbmake and papermill too) mimics an Output widget by sending its state back on
the kernel's shell socket in the middle of the cell, and that send can swallow the wakeup of the cell's
execute_reply, so the run waits out its cell timeout (see tests/test_notebooks.py)."""
from __future__ import annotations

import html
import math
import time

import ipywidgets as widgets
import pandas as pd

from pagedlab.config import ConfigError
from pagedlab.engine.llm import kv_budget_line
from pagedlab.lab.budget import CARDS, card_kv_budget, cost_model_note, sim_config_for
from pagedlab.lab.runs import SimRun, simulate, steady_throughput
from pagedlab.lab.views import batching_timeline, figure_png, fragmentation_stack, throughput_latency
from pagedlab.sim.cost_model import MODEL_SHAPES
from pagedlab.sim.workloads import WORKLOADS

VIEWS = {
    "memory": lambda runs: fragmentation_stack({name: run.timeline for name, run in runs.items()}),
    "throughput": lambda runs: throughput_latency(runs),
    "batching": lambda runs: batching_timeline(next(iter(runs.values())), title=next(iter(runs))),
}
ARRIVALS = ("all at once", "Poisson")
STYLE = {"description_width": "initial"}


def slider(kind, description: str, **kwargs):
    return kind(description=description, continuous_update=False, style=STYLE,
                layout=widgets.Layout(width="440px"), **kwargs)


class SimPlayground:
    """`controls` holds one widget per engine argument; `figures` the figures of the last run, by view name;
    `history` one row per run (its settings and results); `pinned` the run drawn beside the newest."""

    def __init__(self, num_requests: int = 100, card_gib: int = 40, model: str = "llama-2-13b",
                 views: tuple[str, ...] = ("memory", "throughput"), block_size: int = 16,
                 gpu_memory_utilization: float = 0.9, max_model_len: int = 2048, allocator: str = "paged",
                 workload: str = "sharegpt", preemption_mode: str = "recompute", enable_prefix_caching: bool = False,
                 arrivals: str = "all at once", request_rate: float = 8.0) -> None:
        self.num_requests, self.views = num_requests, views
        self.controls = {
            "model": widgets.Dropdown(options=list(MODEL_SHAPES), value=model, description="model shape",
                                      style=STYLE),
            "card_gib": widgets.Dropdown(options=[(f"{name} ({gib:g} GiB)", gib) for name, gib in CARDS.items()],
                                         value=card_gib, description="GPU", style=STYLE),
            "workload": widgets.Dropdown(options=list(WORKLOADS), value=workload, description="workload",
                                         style=STYLE),
            "gpu_memory_utilization": slider(widgets.FloatSlider, "gpu_memory_utilization",
                                             value=gpu_memory_utilization, min=0.3, max=0.95, step=0.05),
            "block_size": slider(widgets.SelectionSlider, "block_size", value=block_size,
                                 options=[1, 2, 4, 8, 16, 32, 64, 128, 256]),
            "max_model_len": slider(widgets.SelectionSlider, "max_model_len", value=max_model_len,
                                    options=[512, 1024, 2048, 4096]),
            "arrivals": widgets.ToggleButtons(options=ARRIVALS, value=arrivals, description="arrivals", style=STYLE),
            "request_rate": slider(widgets.FloatSlider, "Poisson rate (requests/s)", value=request_rate, min=1,
                                   max=40, step=1),
            "allocator": widgets.ToggleButtons(options=["paged", "static"], value=allocator, description="allocator"),
            "preemption_mode": widgets.ToggleButtons(options=["recompute", "swap"], value=preemption_mode,
                                                     description="preemption"),
            "enable_prefix_caching": widgets.Checkbox(value=enable_prefix_caching, description="prefix caching"),
        }
        self.pin_button = widgets.Button(description="pin this run", icon="thumb-tack",
                                         tooltip="keep this run drawn beside the next ones")
        self.unpin_button = widgets.Button(description="clear the pin")
        self.pin_button.on_click(lambda _: self.pin())
        self.unpin_button.on_click(lambda _: self.unpin())
        self.budget, self.cost_note, self.summary, self.table = (widgets.HTML() for _ in range(4))
        self.images = {view: widgets.Image(format="png") for view in views}
        self.plots = widgets.VBox(list(self.images.values()))
        self.figures: dict = {}
        self.last_run: SimRun | None = None
        self.pinned: tuple[str, SimRun] | None = None
        self.history: list[dict] = []
        for control in self.controls.values():
            control.observe(self.run, names="value")
        c = self.controls
        self.widget = widgets.VBox([
            widgets.HBox([c["model"], c["card_gib"], c["workload"]]),
            widgets.HBox([c["gpu_memory_utilization"], c["block_size"]]),
            widgets.HBox([c["max_model_len"], c["enable_prefix_caching"]]),
            widgets.HBox([c["arrivals"], c["request_rate"]]),
            widgets.HBox([c["allocator"], c["preemption_mode"]]),
            self.budget, self.cost_note, self.summary, widgets.HBox([self.pin_button, self.unpin_button]),
            self.plots, self.table])
        self.run()

    @property
    def runs(self) -> int:
        return len(self.history)

    def settings(self) -> dict:
        """The controls' values, rounded as shown (a slider's 0.9 is 0.9, not 0.8999999999999999)."""
        values = {name: control.value for name, control in self.controls.items()}
        values["gpu_memory_utilization"] = round(values["gpu_memory_utilization"], 2)
        values["request_rate"] = round(values["request_rate"], 1)
        return values

    def run(self, change=None) -> None:
        s = self.settings()
        self.controls["request_rate"].disabled = s["arrivals"] != "Poisson"
        report = card_kv_budget(s["model"], s["card_gib"], s["gpu_memory_utilization"], s["block_size"])
        self.budget.value = f"<code>KV cache: {html.escape(kv_budget_line(report))}</code>"
        self.cost_note.value = html.escape(cost_model_note(s["card_gib"], s["model"]))
        # parallel_sampling requests carry n = 4 sequences each: a quarter as many keeps the run as quick.
        num_requests = self.num_requests // 4 if s["workload"] == "parallel_sampling" else self.num_requests
        config = sim_config_for(report, workload=s["workload"], num_requests=num_requests,
                                allocator=s["allocator"], max_model_len=s["max_model_len"],
                                preemption_mode=s["preemption_mode"],
                                enable_prefix_caching=s["enable_prefix_caching"],
                                request_rate=s["request_rate"] if s["arrivals"] == "Poisson" else math.inf)
        started = time.perf_counter()
        try:
            run = simulate(config)
        except ConfigError as exc:
            self.summary.value = f"<span style='color:#b71c1c'>ConfigError: {html.escape(str(exc))}</span>"
            self.figures, self.last_run = {}, None
            self.plots.layout.display = "none"
            return
        self.last_run = run
        steady = steady_throughput(run)
        self.history.append({"run": len(self.history) + 1, **setting_columns(s),
                             "steady tok/s": round(steady), "overall tok/s": round(
                                 run.summary["throughput_output_tokens_per_s"]),
                             "mean running": round(run.summary.get("mean_running_seqs", 0), 1),
                             "preemptions": run.summary["preemptions"],
                             "finished": run.summary["finished"], "rejected": run.summary["rejected"]})
        self.summary.value = _summary_line(run.summary, steady, time.perf_counter() - started, self.runs)
        self.redraw()

    def drawn_runs(self) -> dict[str, SimRun]:
        runs = {f"run {self.runs}": self.last_run}
        if self.pinned is not None:
            runs[f"{self.pinned[0]} (pinned)"] = self.pinned[1]
        return runs

    def redraw(self) -> None:
        runs = self.drawn_runs()
        self.figures = {view: VIEWS[view](runs) for view in self.views}
        self.table.value = self.history_html()
        for view, fig in self.figures.items():
            self.images[view].value = figure_png(fig)
        self.plots.layout.display = None

    def pin(self) -> None:
        if self.last_run is not None:
            self.pinned = (f"run {self.runs}", self.last_run)
            self.redraw()

    def unpin(self) -> None:
        self.pinned = None
        if self.last_run is not None:
            self.redraw()

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history).set_index("run") if self.history else pd.DataFrame()

    def history_html(self, last: int = 12) -> str:
        frame = self.history_frame().iloc[::-1].head(last)
        pinned = self.pinned[0] if self.pinned else None
        frame.index = [f"{i} (pinned)" if f"run {i}" == pinned else str(i) for i in frame.index]
        return ("<b>Every run so far</b> (newest first; steady tok/s stops where the drain tail begins: after the "
                "last admission, once fewer than half the usual batch still runs):" + frame.to_html(border=0, classes="pagedlab-runs", float_format="{:g}".format))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def setting_columns(s: dict) -> dict:
    """A run's settings as short table columns."""
    return {"model": s["model"], "GPU": next(n for n, g in CARDS.items() if g == s["card_gib"]),
            "workload": s["workload"], "util": s["gpu_memory_utilization"], "block": s["block_size"],
            "max_model_len": s["max_model_len"],
            "arrivals": f"Poisson {s['request_rate']:g}/s" if s["arrivals"] == "Poisson" else "all at once",
            "allocator": s["allocator"], "preemption": s["preemption_mode"],
            "prefix cache": "on" if s["enable_prefix_caching"] else "off"}


def _summary_line(summary: dict, steady: float, wall_seconds: float, number: int) -> str:
    return (f"run {number}: <b>{steady:,.0f} output tok/s steady</b> ({summary['throughput_output_tokens_per_s']:,.0f} "
            f"overall, drain tail included), {summary.get('memory_utilization', 0):.1%} of allocated KV slots hold "
            f"tokens, {summary.get('mean_running_seqs', 0):.1f} sequences running on average (peak "
            f"{summary.get('peak_running_seqs', 0)}), {summary['preemptions']} preemptions, "
            f"{summary['finished']} finished / {summary['rejected']} rejected, prefix-cache hit rate "
            f"{summary['prefix_cache_hit_rate']:.0%}; {summary['simulated_seconds']:.1f} simulated s in "
            f"{wall_seconds:.2f} s")
