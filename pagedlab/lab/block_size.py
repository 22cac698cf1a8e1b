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

from pagedlab.lab.explorer import ShownInOutput
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


def block_size_figure(sweep: pd.DataFrame, kernel: pd.DataFrame, kernel_card: str, reuse: pd.DataFrame,
                      selected: int, selected_run: SimRun, system_prompt_len: int = 250) -> Figure:
    """Top: the three sides of the choice against the block size, the selected size marked. Bottom: where every
    KV slot is over the run at the selected size."""
    fig = Figure(figsize=(13, 7.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1])
    waste_ax, kernel_ax, reuse_ax = top.subplots(1, 3)
    panels = ((waste_ax, sweep, "waste_%", "#c62828", "% of allocated slots holding no token",
               "memory: internal fragmentation (simulated)"),
              (kernel_ax, kernel, "time_us", "#1565c0", "paged decode attention (µs)",
               f"speed: decode kernel on {kernel_card}"),
              (reuse_ax, reuse, "reused_%", "#2e7d32", f"% of a {system_prompt_len}-token shared prompt reused",
               "sharing: prefix-cache reuse (simulated)"))
    for ax, frame, column, color, ylabel, title in panels:
        ax.plot(frame["block_size"], frame[column], marker="o", color=color)
        chosen = frame[frame["block_size"] == selected]
        ax.plot(chosen["block_size"], chosen[column], marker="o", ms=12, mfc="none", mec="black", mew=2, ls="none",
                label=f"block {selected}: {chosen[column].iloc[0]:.1f}" if len(chosen) else None)
        ax.axvline(selected, color="black", lw=0.8, ls=":")
        _log2_axis(ax, frame["block_size"])
        ax.set(ylabel=ylabel, ylim=(0, max(frame[column].max() * 1.15, 1)))
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="small", loc="best")
    stack_ax = bottom.subplots()
    tl = selected_run.timeline
    shares = [tl[f"mem_{kind}"] / tl["mem_capacity"] for kind in CATEGORIES]
    stack_ax.stackplot(tl["time"], shares, colors=[CATEGORY_COLORS[k] for k in CATEGORIES],
                       labels=[CATEGORY_LABELS[k] for k in CATEGORIES], step="post")
    stack_ax.set(xlim=(tl["time"].min(), tl["time"].max()), ylim=(0, 1), xlabel="simulated seconds",
                 ylabel="share of the KV cache",
                 title=f"block {selected}: where every KV slot is during the run "
                       f"({selected_run.summary['mean_running_seqs']:.1f} sequences running on average)")
    handles, labels = stack_ax.get_legend_handles_labels()
    stack_ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return fig


class BlockSizeExplorer(ShownInOutput):
    """A block-size slider over `block_size_figure`. `runs` holds the memory sweep, `kernel` and `kernel_card`
    the kernel times and the card they were taken on, `reuse` the prefix-cache sweep."""

    def __init__(self, runs: dict[int, SimRun], kernel: pd.DataFrame, kernel_card: str, reuse: pd.DataFrame,
                 cost_note: str = "", block_size: int = 16, system_prompt_len: int = 250) -> None:
        self.runs, self.kernel, self.kernel_card, self.reuse = runs, kernel, kernel_card, reuse
        self.sweep = sweep_frame(runs)
        self.system_prompt_len = system_prompt_len
        self.slider = widgets.SelectionSlider(options=list(runs), value=block_size, description="block_size",
                                              continuous_update=False, style={"description_width": "initial"},
                                              layout=widgets.Layout(width="480px"))
        self.slider.add_class("pagedlab-main-control")
        self.status = widgets.HTML()
        self.cost_note = widgets.HTML(html.escape(cost_note))
        self.plot = widgets.Output()
        self.plot.add_class("pagedlab-main-figure")
        self.figure: Figure | None = None
        self.slider.observe(self.redraw, names="value")
        self.widget = widgets.VBox([self.slider, self.status, self.cost_note, self.plot])
        self.redraw()

    def draw(self) -> Figure:
        size = self.slider.value
        row = self.sweep.set_index("block_size").loc[size]
        kernel = self.kernel.set_index("block_size")["time_us"].get(size, np.nan)
        reused = self.reuse.set_index("block_size")["reused_%"].get(size, np.nan)
        self.status.value = (f"<b>block {size}</b>: {row['waste_%']:.1f}% of allocated slots hold no token, "
                             f"{row['mean_running_seqs']:.1f} sequences running on average, "
                             f"{row['steady_tok_s']:,.0f} output tok/s steady; decode kernel {kernel:.0f} µs on "
                             f"{html.escape(self.kernel_card)}; {reused:.0f}% of a {self.system_prompt_len}-token "
                             "shared prompt reused from the prefix cache")
        self.figure = block_size_figure(self.sweep, self.kernel, self.kernel_card, self.reuse, size, self.runs[size],
                                        self.system_prompt_len)
        return self.figure
