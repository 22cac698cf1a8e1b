"""The lab's figures: each function draws one idea and returns a matplotlib Figure.

Figures are built with matplotlib's object API (`Figure`, not pyplot): nothing is registered globally, so a
widget can redraw one as often as it likes, from any thread, without leaking or showing it twice. Importing this
module teaches Jupyter to show such a Figure as a PNG.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pagedlab.lab.request_states import STATE_COLORS, STATE_LABELS, STATES, request_states
from pagedlab.lab.runs import steady_throughput, steady_window_end

GiB = 2**30
CATEGORIES = ("tokens", "internal", "reserved", "external", "free")
CATEGORY_COLORS = {"tokens": "#2e7d32", "internal": "#f9a825", "reserved": "#c62828", "external": "#6a1b9a",
                   "free": "#e0e0e0"}
CATEGORY_LABELS = {"tokens": "tokens (KV of computed tokens)", "internal": "internal (unused end of a block)",
                   "reserved": "reserved (for tokens not produced yet)",
                   "external": "external (free, in holes too small)", "free": "free"}


def figure_png(fig: Figure, crop: bool | None = None) -> bytes:
    """The figure as PNG bytes. `crop` trims the margins, at the cost of a second rendering pass; by default only
    a figure without a layout engine is cropped (constrained layout already fits everything inside)."""
    if crop is None:
        crop = fig.get_layout_engine() is None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight" if crop else None)
    return buffer.getvalue()


def _show_figures_in_jupyter() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["image/png"].for_type(Figure, figure_png)


_show_figures_in_jupyter()


def _named(items, default_name: str = "") -> dict:
    """Views take one thing or a {name: thing} dict of them to draw side by side."""
    return dict(items) if isinstance(items, dict) else {default_name: items}


def _panels(count: int, width: float = 5.2, height: float = 3.6, **kwargs) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * count, height), layout="constrained")
    return fig, list(fig.subplots(1, count, squeeze=False, **kwargs)[0])


def efficiency(timeline: pd.DataFrame) -> float:
    """Of all slots allocated over the run (steps with sequences running), the share holding tokens."""
    busy = timeline[timeline["num_running_seqs"] > 0]
    return busy["mem_tokens"].sum() / max(busy["mem_allocated"].sum(), 1)


# --- memory -----------------------------------------------------------------------------------------------------
def fragmentation_stack(timelines, x: str = "time") -> Figure:
    """Where every KV slot is at every step, as shares of the cache: one panel per timeline."""
    timelines = _named(timelines)
    fig, axes = _panels(len(timelines), width=4.4 + 3.0 / len(timelines), sharey=True)   # 3 inches of legend
    for ax, (name, tl) in zip(axes, timelines.items()):
        shares = [tl[f"mem_{kind}"] / tl["mem_capacity"] for kind in CATEGORIES]
        ax.stackplot(tl[x], shares, colors=[CATEGORY_COLORS[k] for k in CATEGORIES],
                     labels=[CATEGORY_LABELS[k] for k in CATEGORIES], step="post")
        ax.set_title(f"{name}\n{efficiency(tl):.1%} of allocated slots hold tokens".lstrip(), fontsize="medium")
        ax.set_xlabel("simulated seconds" if x == "time" else x)
        ax.set_xlim(tl[x].min(), tl[x].max())
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of the KV cache")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right center", fontsize="small")
    return fig


def waste_bars(runs: dict) -> Figure:
    """Each run's average split of the cache into the five categories, with its memory efficiency."""
    fig = Figure(figsize=(9, 0.8 + 0.7 * len(runs)), layout="constrained")
    ax = fig.subplots()
    names = list(runs)[::-1]
    left = np.zeros(len(names))
    for kind in CATEGORIES:
        shares = np.array([runs[n].summary[f"mean_{kind}_fraction"] for n in names])
        ax.barh(names, shares, left=left, color=CATEGORY_COLORS[kind], label=CATEGORY_LABELS[kind])
        left += shares
    for y, name in enumerate(names):
        ax.text(1.01, y, f"{runs[name].summary['memory_utilization']:.1%} of allocated\nslots hold tokens",
                va="center", fontsize="small")
    ax.set_xlim(0, 1)
    ax.set_xlabel("average share of the KV cache while requests run")
    ax.set_title("where the KV cache goes, on average, per allocator", fontsize="medium")
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")
    return fig


def sharing_savings(runs: dict) -> Figure:
    """KV slots holding tokens vs the slots the same sequences would need without sharing, over time."""
    fig, axes = _panels(len(runs), sharex=True, sharey=True)
    for ax, (name, run) in zip(axes, runs.items()):
        tl = run.timeline
        needed = tl["mem_tokens"] + tl["mem_shared_saved"]
        ax.plot(tl["time"], needed, color="#c62828", ls="--", label="needed without sharing")
        ax.plot(tl["time"], tl["mem_tokens"], color="#2e7d32", label="stored")
        ax.fill_between(tl["time"], tl["mem_tokens"], needed, color="#a5d6a7", alpha=0.6, label="saved by sharing")
        saved = tl["mem_shared_saved"].sum() / max(needed.sum(), 1)
        copies = int(tl["num_copied_blocks"].sum())
        forks = f"\n{copies} blocks copied for forked samples" if copies else ""
        ax.set_title(f"{name}: {saved:.0%} of token slots saved{forks}", fontsize="medium")
        ax.set_xlabel("simulated seconds")
    axes[0].set_xlim(0, max(run.timeline["time"].max() for run in runs.values()))
    axes[0].set_ylabel("KV slots (tokens)")
    axes[0].legend(fontsize="small")
    return fig


# --- batching and throughput ------------------------------------------------------------------------------------
def _sample_requests(run, max_requests: int) -> pd.DataFrame:
    """An even sample across the arrival order, so late requests (the ones that wait and get preempted) show too."""
    requests = run.requests.dropna(subset=["first_scheduled", "finished"]).copy()
    requests["order"] = requests["request_id"].astype(int)
    requests = requests.sort_values(["arrival", "order"])
    return requests.iloc[np.unique(np.linspace(0, len(requests) - 1, max_requests).round().astype(int))]


def batching_timeline(runs, max_requests: int = 40, title: str = "") -> Figure:
    """Per run, top: each request's life, one state at a time: waiting, running, preempted (waiting to be
    recomputed) or swapped out. Bottom: how many requests are running, waiting and swapped out. Several runs
    ({name: run}) stack on one shared time axis."""
    runs = _named(runs, title)
    sampled = {name: _sample_requests(run, max_requests) for name, run in runs.items()}
    heights = []
    for requests in sampled.values():
        heights += [max(len(requests), 8) / 8, 1.2]
    fig = Figure(figsize=(10, 0.6 + sum(heights) * 1.05), layout="constrained")
    axes = fig.subplots(len(heights), 1, sharex=True, height_ratios=heights)
    end = max(run.timeline["time"].max() for run in runs.values())
    for (name, run), gantt, queues in zip(runs.items(), axes[0::2], axes[1::2]):
        requests = sampled[name]
        rows = {rid: y for y, rid in enumerate(requests["request_id"])}
        states = request_states(run)
        states = states[states["request_id"].isin(rows)]
        for state in STATES:      # one collection per state: thousands of bars draw as fast as one
            spans = states[states["state"] == state]
            y, x0, x1 = spans["request_id"].map(rows).to_numpy(), spans["start"].to_numpy(), spans["end"].to_numpy()
            boxes = np.stack([np.stack([x0, y - 0.4], 1), np.stack([x1, y - 0.4], 1), np.stack([x1, y + 0.4], 1),
                              np.stack([x0, y + 0.4], 1)], axis=1)
            gantt.add_collection(PolyCollection(boxes, facecolors=STATE_COLORS[state], edgecolors="none"))
        gantt.set_ylim(len(requests) - 0.5, -0.5)
        gantt.set_yticks([])
        gantt.set_ylabel(f"{len(requests)} of {len(run.requests)}\nrequests,\nby arrival", fontsize="small")
        preemptions = run.summary.get("preemptions", 0)
        gantt.set_title(f"{name or 'batching timeline'}: {run.summary['simulated_seconds']:.1f} s, "
                        f"{preemptions} preemptions".lstrip(": "), fontsize="medium")
        tl = run.timeline
        for column, color in (("num_running", "#2e7d32"), ("num_waiting", "#9e9e9e"), ("num_swapped", "#7e57c2")):
            queues.plot(tl["time"], tl[column], drawstyle="steps-post", color=color, label=column[4:])
        queues.set_ylabel("requests")
        queues.set_ylim(bottom=0)
    axes[0].legend(handles=[Patch(color=STATE_COLORS[s], label=STATE_LABELS[s]) for s in STATES],
                   loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", title="each request's state",
                   title_fontsize="small")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", title="queue lengths",
                   title_fontsize="small")
    axes[-1].set_xlim(0, end)
    axes[-1].set_xlabel("simulated seconds")
    return fig


def tokens_per_second(timeline: pd.DataFrame, bins: int = 40, time: str = "time") -> tuple[np.ndarray, np.ndarray]:
    """Generated tokens per second in `bins` equal slices of the run: (slice centres, rates)."""
    edges = np.linspace(0, max(timeline[time].max(), 1e-9), bins + 1)
    tokens, _ = np.histogram(timeline[time], edges, weights=timeline["num_generated_tokens"])
    return (edges[:-1] + edges[1:]) / 2, tokens / np.diff(edges)


def throughput_latency(runs) -> Figure:
    """Left: output tokens per second over the run; a dotted line marks where the steady rate ends and the drain
    tail begins (`steady_window_end`). Right: each request's latency per output token, at the time it finished
    (the vLLM paper's normalized latency)."""
    runs = _named(runs)
    fig, (rate_ax, latency_ax) = _panels(2)
    for name, run in runs.items():
        centres, rates = tokens_per_second(run.timeline)
        label = (f"{name}: {steady_throughput(run):,.0f} tok/s steady, "
                 f"{run.summary['throughput_output_tokens_per_s']:,.0f} overall").lstrip(": ")
        line, = rate_ax.plot(centres, rates, label=label)
        rate_ax.axvline(steady_window_end(run), color=line.get_color(), ls=":", lw=1)
        done = run.requests.dropna(subset=["e2e"])
        latency_ax.scatter(done["finished"], done["e2e"] / done["output_tokens"].clip(lower=1), s=6,
                           color=line.get_color(), alpha=0.6, label=name or None)
    rate_ax.set(xlabel="simulated seconds", ylabel="output tokens / s", title="throughput")
    latency_ax.set(xlabel="finished at (simulated seconds)", ylabel="seconds per output token",
                   title="normalized latency")
    rate_ax.legend(fontsize="small")
    if len(runs) > 1:
        latency_ax.legend(fontsize="small", markerscale=3)
    return fig


# --- sizing -----------------------------------------------------------------------------------------------------
def memory_budget_bars(reports) -> Figure:
    """Each card split into what the engine gives the weights, the activations, everything outside torch, the
    KV cache, and what gpu_memory_utilization leaves unused."""
    reports = _named(reports)
    fig = Figure(figsize=(10, 1.2 + 0.55 * len(reports)), layout="constrained")
    ax = fig.subplots()
    parts = {"weights": "#546e7a", "peak_activation": "#ffb74d", "non_torch": "#a1887f", "kv_cache": "#2e7d32",
             "unused": "#eeeeee"}
    names = list(reports)[::-1]
    left = np.zeros(len(names))
    for part, color in parts.items():
        sizes = np.array([max(r["total"] * (1 - r["gpu_memory_utilization"]), 0) if part == "unused"
                          else max(r[part], 0) for r in (reports[n] for n in names)]) / GiB
        ax.barh(names, sizes, left=left, color=color, label=part.replace("_", " "))
        left += sizes
    for y, name in enumerate(names):
        r = reports[name]
        ax.text(left[y] + 0.5, y, f"{r['num_gpu_blocks']:,} blocks\n= {r['num_gpu_blocks'] * r['block_size']:,} "
                                  "tokens", va="center", fontsize="small")
    ax.set_xlim(0, left.max() * 1.22)
    ax.set_xlabel("GiB")
    fig.legend(loc="outside lower center", ncols=len(parts), fontsize="small")
    return fig


def block_size_tradeoff(sweep: pd.DataFrame, kernel: pd.DataFrame, kernel_source: str = "") -> Figure:
    """Left: memory wasted inside partly filled blocks grows with the block size. Right: the decode kernel's
    time per block size (bigger blocks, fewer table lookups)."""
    fig, (waste_ax, kernel_ax) = _panels(2, width=5.0)
    waste_ax.plot(sweep["block_size"], 100 * (1 - sweep["memory_utilization"]), marker="o", color="#c62828")
    waste_ax.set(xscale="log", xlabel="block size (tokens)", ylabel="% of allocated slots holding no token",
                 title="memory: internal fragmentation")
    kernel_ax.plot(kernel["block_size"], kernel["time_us"], marker="o", color="#1565c0")
    kernel_ax.set(xscale="log", xlabel="block size (tokens)", ylabel="paged decode attention (us)",
                  title=f"speed: {kernel_source}".rstrip(": "))
    kernel_ax.set_ylim(0, kernel["time_us"].max() * 1.15)
    for ax in (waste_ax, kernel_ax):
        ax.set_xticks(sweep["block_size"], [str(b) for b in sweep["block_size"]])
        ax.minorticks_off()
    return fig
