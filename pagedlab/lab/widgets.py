"""The simulator playground: the engine's settings as widgets. Any change re-runs the simulator (under a second
at 100 requests) on a GPU card of your choice and redraws the figures in place."""
from __future__ import annotations

import html
import time

import ipywidgets as widgets
from IPython.display import clear_output, display

from pagedlab.config import ConfigError
from pagedlab.engine.llm import kv_budget_line
from pagedlab.lab.budget import card_kv_budget, sim_config_for
from pagedlab.lab.runs import SimRun, simulate
from pagedlab.lab.views import batching_timeline, fragmentation_stack, throughput_latency
from pagedlab.sim.cost_model import MODEL_SHAPES
from pagedlab.sim.workloads import WORKLOADS

CARDS = [("24 GiB (L4)", 24), ("40 GiB (A100-40GB)", 40), ("80 GiB (H100)", 80), ("141 GiB (H200)", 141)]
VIEWS = {
    "memory": lambda run, name: fragmentation_stack({name: run.timeline}),
    "throughput": lambda run, name: throughput_latency({name: run}),
    "batching": lambda run, name: batching_timeline(run, title=name),
}


class SimPlayground:
    """`controls` holds one widget per engine argument; `figures` the figures of the last run, by view name."""

    def __init__(self, num_requests: int = 100, card_gib: int = 40, model: str = "llama-2-13b",
                 views: tuple[str, ...] = ("memory", "throughput"), block_size: int = 16,
                 gpu_memory_utilization: float = 0.9, max_model_len: int = 2048, allocator: str = "paged",
                 workload: str = "sharegpt", preemption_mode: str = "recompute") -> None:
        self.num_requests, self.views = num_requests, views
        style, wide = {"description_width": "initial"}, widgets.Layout(width="440px")
        self.controls = {
            "model": widgets.Dropdown(options=list(MODEL_SHAPES), value=model, description="model shape",
                                      style=style),
            "card_gib": widgets.Dropdown(options=CARDS, value=card_gib, description="GPU", style=style),
            "gpu_memory_utilization": widgets.FloatSlider(
                value=gpu_memory_utilization, min=0.3, max=0.95, step=0.05, description="gpu_memory_utilization",
                continuous_update=False, style=style, layout=wide),
            "block_size": widgets.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=block_size,
                                                  description="block_size", continuous_update=False, style=style,
                                                  layout=wide),
            "max_model_len": widgets.SelectionSlider(options=[512, 1024, 2048, 4096], value=max_model_len,
                                                     description="max_model_len", continuous_update=False,
                                                     style=style, layout=wide),
            "allocator": widgets.ToggleButtons(options=["paged", "static"], value=allocator, description="allocator"),
            "workload": widgets.Dropdown(options=list(WORKLOADS), value=workload, description="workload",
                                         style=style),
            "preemption_mode": widgets.ToggleButtons(options=["recompute", "swap"], value=preemption_mode,
                                                     description="preemption"),
        }
        self.budget = widgets.HTML()
        self.summary = widgets.HTML()
        self.plots = widgets.Output()
        self.figures: dict = {}
        self.last_run: SimRun | None = None
        self.runs = 0
        for control in self.controls.values():
            control.observe(self.run, names="value")
        c = self.controls
        self.widget = widgets.VBox([
            widgets.HBox([c["model"], c["card_gib"], c["workload"]]),
            widgets.HBox([c["gpu_memory_utilization"], c["block_size"]]),
            c["max_model_len"],
            widgets.HBox([c["allocator"], c["preemption_mode"]]),
            self.budget, self.summary, self.plots])
        self.run()

    def settings(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def run(self, change=None) -> None:
        s = self.settings()
        report = card_kv_budget(s["model"], s["card_gib"], s["gpu_memory_utilization"], s["block_size"])
        self.budget.value = f"<code>KV cache: {html.escape(kv_budget_line(report))}</code>"
        # parallel_sampling requests carry n = 4 sequences each: a quarter as many keeps the run as quick.
        num_requests = self.num_requests // 4 if s["workload"] == "parallel_sampling" else self.num_requests
        config = sim_config_for(report, workload=s["workload"], num_requests=num_requests,
                                allocator=s["allocator"], max_model_len=s["max_model_len"],
                                preemption_mode=s["preemption_mode"])
        started = time.perf_counter()
        try:
            run = simulate(config)
        except ConfigError as exc:
            self.summary.value = f"<span style='color:#b71c1c'>ConfigError: {html.escape(str(exc))}</span>"
            self.figures, self.last_run = {}, None
            with self.plots:
                clear_output()
            return
        self.runs += 1
        self.last_run = run
        self.summary.value = _summary_line(run.summary, time.perf_counter() - started)
        name = f"{s['allocator']}, block {s['block_size']}"
        self.figures = {view: VIEWS[view](run, name) for view in self.views}
        with self.plots:
            clear_output(wait=True)
            for fig in self.figures.values():
                display(fig)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _summary_line(summary: dict, wall_seconds: float) -> str:
    return (f"<b>{summary['throughput_output_tokens_per_s']:,.0f} output tok/s</b>, "
            f"{summary.get('memory_utilization', 0):.1%} of allocated KV slots hold tokens, "
            f"{summary.get('mean_running_seqs', 0):.1f} sequences running on average (peak "
            f"{summary.get('peak_running_seqs', 0)}), {summary['preemptions']} preemptions, "
            f"{summary['finished']} finished / {summary['rejected']} rejected; "
            f"{summary['simulated_seconds']:.1f} simulated s in {wall_seconds:.2f} s")
