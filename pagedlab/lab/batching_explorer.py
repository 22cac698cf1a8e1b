"""Notebook 4's explorer: requests arriving over time into a KV cache of a chosen size; every request's waiting,
running, preempted and swapped intervals, and the queues, redrawn as the budget shrinks into preemption."""
from __future__ import annotations

import ipywidgets as widgets
from matplotlib.figure import Figure

from pagedlab.lab.explorer import STYLE, Explorer, slider_layout
from pagedlab.lab.runs import SimRun, simulate
from pagedlab.lab.views import batching_timeline
from pagedlab.sim.simulator import SimConfig

KV_GIB_OPTIONS = [0.25, 0.375, 0.5, 0.75, 1.0, 2.0, 4.0]


class BatchingExplorer(Explorer):
    """Controls: the KV budget, the arrival rate, the preemption mode and the batching policy."""

    main_control = "kv_gib"

    def __init__(self, num_requests: int = 60, kv_gib: float = 1.0, request_rate: float = 10.0,
                 preemption_mode: str = "recompute", batching: str = "continuous", max_requests: int = 30) -> None:
        self.num_requests, self.max_requests = num_requests, max_requests
        self.last_run: SimRun | None = None
        controls = {
            "kv_gib": widgets.SelectionSlider(options=KV_GIB_OPTIONS, value=kv_gib, description="KV budget (GiB)",
                                              continuous_update=False, style=STYLE, layout=slider_layout()),
            "request_rate": widgets.SelectionSlider(options=[2.0, 5.0, 10.0, 20.0, 50.0], value=request_rate,
                                                    description="arrivals (requests/s)", continuous_update=False,
                                                    style=STYLE, layout=slider_layout()),
            "preemption_mode": widgets.ToggleButtons(options=["recompute", "swap"], value=preemption_mode,
                                                     description="preemption", style=STYLE),
            "batching": widgets.ToggleButtons(options=["continuous", "static"], value=batching,
                                              description="batching", style=STYLE),
        }
        super().__init__(controls)
        self.redraw()

    def settings(self, **values) -> SimConfig:
        return SimConfig(workload="sharegpt", num_requests=self.num_requests, **values)

    def draw(self, **values) -> tuple[Figure, str]:
        run = self.last_run = simulate(self.settings(**values))
        s = run.summary
        name = f"{values['batching']} batching, {values['kv_gib']:g} GiB KV, preemption by {values['preemption_mode']}"
        figure = batching_timeline({name: run}, max_requests=self.max_requests)
        note = (f"{s['kv_capacity_tokens']:,} KV slots; <b>{s['preemptions']} preemptions</b>, "
                f"{s['mean_running_seqs']:.1f} requests running on average, "
                f"{s['throughput_output_tokens_per_s']:,.0f} output tok/s, mean latency {s['mean_e2e_s']:.1f} s")
        return figure, note
