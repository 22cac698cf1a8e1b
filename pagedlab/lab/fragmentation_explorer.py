"""Notebook 1's explorer: the static arena and the paged pool of the same trace at the same instant, block by
block, above where every slot was over the whole run; a time slider moves the instant."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import ipywidgets as widgets
from matplotlib.figure import Figure

import numpy as np

from pagedlab.lab.explorer import STYLE, Explorer, slider_layout
from pagedlab.lab.memory_maps import BlockMap, columns_for, draw_map, map_at, map_legend
from pagedlab.lab.runs import SimRun, simulate
from pagedlab.lab.views import CATEGORIES, CATEGORY_COLORS, CATEGORY_LABELS
from pagedlab.sim.simulator import SimConfig
from pagedlab.sim.workloads import WORKLOADS, TraceRequest, load_trace

KV_GIB_OPTIONS = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0]


def step_at(run: SimRun, time: float) -> int:
    """The last step that ended at or before `time` (0: none yet)."""
    ended = run.timeline["time"].to_numpy()
    index = int(np.searchsorted(ended, time, side="right"))
    return int(run.timeline["step"].iloc[index - 1]) if index else 0


def instant_shares(picture: BlockMap) -> dict[str, float]:
    """The five categories' shares of the cache at one instant (the engine's accounting)."""
    usage = picture.usage
    return {kind: usage[kind] / usage["capacity"] for kind in CATEGORIES}


class FragmentationExplorer(Explorer):
    """Static vs paged over one trace. Controls: the instant, block size, KV budget, max_model_len, workload, the
    static reservation, and a request to follow (its blocks stay coloured, everyone else's grey)."""

    main_control = "time"

    def __init__(self, num_requests: int = 100, kv_gib: float = 1.0, block_size: int = 16,
                 max_model_len: int = 2048, workload: str = "sharegpt", static_reservation: str = "max_model_len",
                 request_rate: float = float("inf"), time: float = 5.0) -> None:
        self.num_requests, self.request_rate = num_requests, request_rate
        self._cache: OrderedDict = OrderedDict()
        controls = {
            "time": widgets.FloatSlider(value=time, min=0, max=max(time, 1.0), step=0.1, description="time (s)",
                                        readout_format=".1f", continuous_update=False, style=STYLE,
                                        layout=slider_layout()),
            "block_size": widgets.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=block_size,
                                                  description="block_size", continuous_update=False, style=STYLE,
                                                  layout=slider_layout()),
            "kv_gib": widgets.SelectionSlider(options=KV_GIB_OPTIONS, value=kv_gib, description="KV budget (GiB)",
                                              continuous_update=False, style=STYLE, layout=slider_layout()),
            "max_model_len": widgets.SelectionSlider(options=[256, 512, 1024, 1536, 2048, 4096],
                                                     value=max_model_len, description="max_model_len",
                                                     continuous_update=False, style=STYLE, layout=slider_layout()),
            "workload": widgets.Dropdown(options=list(WORKLOADS), value=workload, description="workload",
                                         style=STYLE),
            "static_reservation": widgets.ToggleButtons(
                options=[("max_model_len", "max_model_len"), ("prompt + max_tokens", "request")],
                value=static_reservation, description="static reserves", style=STYLE),
            "request": widgets.Dropdown(options=[("nobody", -1)], value=-1, description="follow request",
                                        style=STYLE),
        }
        super().__init__(controls)
        self.redraw()

    def settings(self, **values) -> SimConfig:
        parallel = values["workload"] == "parallel_sampling"     # n = 4 sequences a request: a quarter of them
        return SimConfig(workload=values["workload"],
                         num_requests=self.num_requests // 4 if parallel else self.num_requests,
                         request_rate=self.request_rate, kv_gib=values["kv_gib"], block_size=values["block_size"],
                         max_model_len=values["max_model_len"], static_reservation=values["static_reservation"])

    def runs(self, config: SimConfig) -> tuple[dict[str, SimRun], list[TraceRequest]]:
        """Both allocators on the same trace, cached: moving back to a setting re-runs nothing."""
        key = repr(config)
        if key not in self._cache:
            trace = load_trace(config.workload, config.num_requests, config.seed, config.request_rate)
            runs = {name: simulate(replace(config, allocator=name), trace) for name in ("static", "paged")}
            self._cache[key] = (runs, trace)
            if len(self._cache) > 8:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def pictures(self, runs: dict[str, SimRun], trace: list[TraceRequest], time: float) -> dict[str, BlockMap]:
        """Each run's memory map at `time`: the simulation replayed to that step (fast-forwarded)."""
        return {name: map_at(run.config, trace, step_at(run, time)) for name, run in runs.items()}

    def draw(self, time, request, **settings) -> tuple[Figure, str]:
        runs, trace = self.runs(self.settings(**settings))
        self._fit_controls(runs)
        time, request = self.controls["time"].value, self.controls["request"].value
        followed = None if request < 0 else request
        pictures = self.pictures(runs, trace, time)
        figure = fragmentation_instant_figure(runs, pictures, time, followed)
        return figure, self._note(runs, pictures, time, followed)

    def _fit_controls(self, runs: dict[str, SimRun]) -> None:
        end = max(run.summary["simulated_seconds"] for run in runs.values())
        slider = self.controls["time"]
        self._quiet = True
        try:
            slider.max = round(end, 1) + 0.1
            slider.step = max(round(end / 200, 2), 0.01)
            requests = runs["paged"].requests.sort_values("arrival")
            options = [("nobody", -1)] + [(f"{int(r.request_id)}: {r.prompt_tokens} prompt + {r.output_tokens} "
                                           "output tokens", int(r.request_id)) for r in requests.itertuples()]
            dropdown = self.controls["request"]
            if [v for _, v in dropdown.options] != [v for _, v in options]:
                keep = dropdown.value if dropdown.value in {v for _, v in options} else -1
                dropdown.options = options
                dropdown.value = keep
        finally:
            self._quiet = False

    @staticmethod
    def _note(runs, pictures, time: float, followed: int | None) -> str:
        lines = []
        for name, run in runs.items():
            shares = instant_shares(pictures[name])
            lines.append(f"<b>{name}</b>: {run.summary['finished']} requests done in "
                         f"{run.summary['simulated_seconds']:.1f} s, {run.summary['mean_running_seqs']:.1f} "
                         f"running on average; at {time:.1f} s, external fragmentation {shares['external']:.1%}")
            row = run.requests[run.requests["request_id"] == str(followed)]
            if followed is not None and len(row):
                r = row.iloc[0]
                lines.append(f"&nbsp;&nbsp;request {followed} waits {r.first_scheduled - r.arrival:.1f} s, runs "
                             f"{r.first_scheduled:.1f} to {r.finished:.1f} s, holds "
                             f"{len(pictures[name].blocks_of(followed))} blocks at {time:.1f} s")
        return "<br>".join(lines)


def _thin(timeline, points: int = 600):
    """At most `points` rows, evenly spaced in steps, the last one kept: a stack plot draws as fast at any length."""
    if len(timeline) <= points:
        return timeline
    return timeline.iloc[np.unique(np.linspace(0, len(timeline) - 1, points).round().astype(int))]


def fragmentation_instant_figure(runs: dict[str, SimRun], pictures: dict[str, BlockMap], time: float,
                                 followed: int | None = None) -> Figure:
    """Top: each allocator's physical map at `time`. Bottom: its five slot categories over the run, on one shared
    time axis, with the instant as a line and the followed request's life as a band."""
    fig = Figure(figsize=(10.5, 6.4), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1])
    top = [fig.add_subplot(grid[0, i]) for i in range(2)]
    bottom = [fig.add_subplot(grid[1, 0])]
    bottom.append(fig.add_subplot(grid[1, 1], sharex=bottom[0], sharey=bottom[0]))
    end = max(run.summary["simulated_seconds"] for run in runs.values())
    for (name, run), map_ax, stack_ax in zip(runs.items(), top, bottom):
        picture = pictures[name]
        draw_map(map_ax, picture, columns_for(picture.num_blocks), followed)
        shares = instant_shares(picture)
        reserving = "max_model_len" if run.config.static_reservation == "max_model_len" else "prompt + max_tokens"
        label = f"static (reserves {reserving})" if name == "static" else "paged"
        counts = [f"{kind} {shares[kind]:.0%}" for kind in CATEGORIES]
        map_ax.set_title(f"{label} at {time:.1f} s\n{', '.join(counts[:3])}\n{', '.join(counts[3:])}",
                         fontsize="medium")
        tl = _thin(run.timeline)
        stack_ax.stackplot(tl["time"], [tl[f"mem_{kind}"] / tl["mem_capacity"] for kind in CATEGORIES],
                           colors=[CATEGORY_COLORS[k] for k in CATEGORIES],
                           labels=[CATEGORY_LABELS[k] for k in CATEGORIES], step="post")
        stack_ax.axvline(time, color="black", lw=1.5, label="the instant shown above")
        row = run.requests[run.requests["request_id"] == str(followed)]
        if followed is not None and len(row):
            stack_ax.axvspan(row.iloc[0]["first_scheduled"], row.iloc[0]["finished"], color="black", alpha=0.18,
                             label=f"request {followed} running")
        stack_ax.set_title(f"{name}: all requests done at {run.summary['simulated_seconds']:.1f} s",
                           fontsize="medium")
        stack_ax.set_xlabel("simulated seconds")
    bottom[0].set_xlim(0, end)
    bottom[0].set_ylim(0, 1)
    bottom[0].set_ylabel("share of the KV cache")
    bottom[1].tick_params(labelleft=False)
    handles, labels = bottom[1].get_legend_handles_labels()
    bottom[1].legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small",
                     title="slots over time", title_fontsize="small")
    top[1].legend(handles=map_legend(), loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small",
                  title="memory map: one cell per block" + (f"\n(only request {followed} in colour)"
                                                            if followed is not None else ""),
                  title_fontsize="small")
    return fig
