"""The block size, explored: memory wasted inside blocks (simulated), the decode kernel's time (measured), and how
much of a shared system prompt prefix caching can reuse (simulated, with prefix caching), each against the block
size, with a slider that picks one size and shows its memory over a run. The sweeps run once; the slider only
redraws, so it answers at once."""
from __future__ import annotations

import html
from dataclasses import replace

import ipywidgets as widgets
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pagedlab.lab.explorer import STYLE, Explorer, slider_layout
from pagedlab.lab.runs import SimRun, simulate, steady_throughput
from pagedlab.lab.views import CATEGORIES, CATEGORY_COLORS, CATEGORY_LABELS
from pagedlab.sim.simulator import SimConfig
from pagedlab.sim.workloads import load_trace, make_trace

BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def memory_sweep(base: SimConfig, block_sizes=BLOCK_SIZES) -> dict[int, SimRun]:
    """The same trace and KV cache at every block size."""
    trace = load_trace(base.workload, base.num_requests, base.seed, base.request_rate)
    return {size: simulate(replace(base, block_size=size), trace) for size in block_sizes}


def sweep_frame(runs: dict[int, SimRun]) -> pd.DataFrame:
    return pd.DataFrame([{"block_size": size, "waste_%": 100 * (1 - run.summary["memory_utilization"]),
                          "mean_running_seqs": run.summary["mean_running_seqs"],
                          "steady_tok_s": steady_throughput(run)} for size, run in runs.items()])


def prefix_reuse(block_sizes=BLOCK_SIZES, system_prompt_len: int = 250, num_requests: int = 60,
                 kv_gib: float = 2.0) -> pd.DataFrame:
    """Share of the shared system-prompt tokens that later requests (all but the first with each prompt) take
    from the prefix cache, per block size: only full blocks are cached, so a prompt of 250 tokens shares 240 of
    them at block 16 and none at 256. Requests arrive at 4/s so the first of each prompt has been computed (and
    cached) before the next one comes."""
    trace = make_trace("shared_prefix", num_requests, seed=0, request_rate=4.0, system_prompt_len=system_prompt_len)
    firsts = {str(i) for i, r in enumerate(trace) if r.prefix_id not in {q.prefix_id for q in trace[:i]}}
    rows = []
    for size in block_sizes:
        config = SimConfig(workload="shared_prefix", num_requests=num_requests, kv_gib=kv_gib, block_size=size,
                           enable_prefix_caching=True, request_rate=4.0)
        requests = simulate(config, trace).requests
        later = requests[~requests["request_id"].isin(firsts)]
        rows.append({"block_size": size, "reused_%": 100 * later["cached_tokens"].sum()
                     / (system_prompt_len * len(later))})
    return pd.DataFrame(rows)


def _log2_axis(ax, sizes) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes), [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("block size (tokens)")


class BlockSizeFigure:
    """Top: the three sides of the choice against the block size, the selected size marked. Bottom: where every
    KV slot is over the run at the selected size. The figure is kept: `select(size)` moves the marks and redraws
    only the memory stack, and after the first render its layout stays fixed, so a new size renders without the
    sweeps being drawn or laid out anew."""

    def __init__(self, sweep: pd.DataFrame, kernel: pd.DataFrame, kernel_card: str, reuse: pd.DataFrame,
                 runs: dict[int, SimRun], system_prompt_len: int = 250) -> None:
        self.runs = runs
        self.fig = fig = Figure(figsize=(13, 7.2), layout="constrained")
        top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1])
        panels = ((sweep, "waste_%", "#c62828", "% of allocated slots holding no token",
                   "memory: internal fragmentation (simulated)"),
                  (kernel, "time_us", "#1565c0", "paged decode attention (µs)",
                   f"speed: decode kernel on {kernel_card}"),
                  (reuse, "reused_%", "#2e7d32", f"% of a {system_prompt_len}-token shared prompt reused",
                   "sharing: prefix-cache reuse (simulated)"))
        self.marks = []          # per panel: (axes, values by block size, ring, dotted line)
        for ax, (frame, column, color, ylabel, title) in zip(top.subplots(1, 3), panels):
            ax.plot(frame["block_size"], frame[column], marker="o", color=color)
            ring, = ax.plot([], [], marker="o", ms=12, mfc="none", mec="black", mew=2, ls="none")
            line = ax.axvline(frame["block_size"].iloc[0], color="black", lw=0.8, ls=":")
            _log2_axis(ax, frame["block_size"])
            ax.set(ylabel=ylabel, ylim=(0, max(frame[column].max() * 1.15, 1)))
            ax.set_title(title, fontsize="medium")
            self.marks.append((ax, frame.set_index("block_size")[column], ring, line))
        self.stack_ax = bottom.subplots()
        self.stack_ax.set(ylim=(0, 1), xlabel="simulated seconds", ylabel="share of the KV cache")
        self.stack = []
        self.selected = None

    def select(self, size: int) -> Figure:
        for ax, values, ring, line in self.marks:
            line.set_xdata([size, size])
            if size in values.index:
                ring.set_data([size], [values[size]])
                ring.set_label(f"block {size}: {values[size]:.1f}")
            else:
                ring.set_data([], [])
                ring.set_label("_none")
            ax.legend(fontsize="small", loc="best")
        run, ax = self.runs[size], self.stack_ax
        for collection in self.stack:
            collection.remove()
        tl = run.timeline
        self.stack = ax.stackplot(tl["time"], [tl[f"mem_{kind}"] / tl["mem_capacity"] for kind in CATEGORIES],
                                  colors=[CATEGORY_COLORS[k] for k in CATEGORIES],
                                  labels=[CATEGORY_LABELS[k] for k in CATEGORIES], step="post")
        ax.set_xlim(tl["time"].min(), tl["time"].max())
        ax.set_title(f"block {size}: where every KV slot is during the run "
                     f"({run.summary['mean_running_seqs']:.1f} sequences running on average)")
        if self.selected is None:
            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        self.selected = size
        return self.fig

    def freeze_layout(self) -> None:
        """Keep the positions the first render found (call after it)."""
        self.fig.set_layout_engine("none")


def block_size_figure(sweep: pd.DataFrame, kernel: pd.DataFrame, kernel_card: str, reuse: pd.DataFrame,
                      selected: int, selected_run: SimRun, system_prompt_len: int = 250) -> Figure:
    """BlockSizeFigure's figure at one selected size (a still)."""
    return BlockSizeFigure(sweep, kernel, kernel_card, reuse, {selected: selected_run},
                           system_prompt_len).select(selected)


class BlockSizeExplorer(Explorer):
    """A block-size slider over `block_size_figure`. `runs` holds the memory sweep, `kernel` and `kernel_card`
    the kernel times and the card they were taken on, `reuse` the prefix-cache sweep. Its one figure is redrawn
    in place, uncropped (its layout is fixed), which keeps a redraw well under a second."""

    main_control = "block_size"
    crop = False

    def __init__(self, runs: dict[int, SimRun], kernel: pd.DataFrame, kernel_card: str, reuse: pd.DataFrame,
                 cost_note: str = "", block_size: int = 16, system_prompt_len: int = 250) -> None:
        self.runs, self.kernel, self.kernel_card, self.reuse = runs, kernel, kernel_card, reuse
        self.sweep = sweep_frame(runs)
        self.system_prompt_len = system_prompt_len
        slider = widgets.SelectionSlider(options=list(runs), value=block_size, description="block_size",
                                         continuous_update=False, style=STYLE, layout=slider_layout("480px"))
        super().__init__({"block_size": slider}, extra=[widgets.HTML(html.escape(cost_note))])
        self._figure = BlockSizeFigure(self.sweep, kernel, kernel_card, reuse, runs, system_prompt_len)
        self.redraw()
        self._figure.freeze_layout()

    def draw(self, block_size: int) -> tuple[Figure, str]:
        row = self.sweep.set_index("block_size").loc[block_size]
        kernel = self.kernel.set_index("block_size")["time_us"].get(block_size, np.nan)
        reused = self.reuse.set_index("block_size")["reused_%"].get(block_size, np.nan)
        note = (f"<b>block {block_size}</b>: {row['waste_%']:.1f}% of allocated slots hold no token, "
                f"{row['mean_running_seqs']:.1f} sequences running on average, "
                f"{row['steady_tok_s']:,.0f} output tok/s steady; decode kernel {kernel:.0f} µs on "
                f"{html.escape(self.kernel_card)}; {reused:.0f}% of a {self.system_prompt_len}-token "
                "shared prompt reused from the prefix cache")
        return self._figure.select(block_size), note
