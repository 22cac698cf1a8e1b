"""The lab's figures: each function draws one idea and returns a matplotlib Figure.

Figures are built with matplotlib's object API (`Figure`, not pyplot): nothing is registered globally, so a
widget can redraw one as often as it likes, from any thread, without leaking or showing it twice. Importing this
module teaches Jupyter to show such a Figure as a PNG.
"""
from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator

from pagedlab.core.snapshot import Snapshot
from pagedlab.lab.runs import steady_throughput

GiB = 2**30
CATEGORIES = ("tokens", "internal", "reserved", "external", "free")
CATEGORY_COLORS = {"tokens": "#2e7d32", "internal": "#f9a825", "reserved": "#c62828", "external": "#6a1b9a",
                   "free": "#e0e0e0"}
CATEGORY_LABELS = {"tokens": "tokens (KV of computed tokens)", "internal": "internal (unused end of a block)",
                   "reserved": "reserved (for tokens not produced yet)",
                   "external": "external (free, in holes too small)", "free": "free"}
FREE_COLOR, CACHED_FREE_COLOR = "#eeeeee", "#90caf9"
OWNER_COLORS = [to_rgb(c) for c in ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                                    "#7f7f7f", "#bcbd22", "#17becf")]
STATE_COLORS = {"waiting": "#bdbdbd", "prefill": "#1565c0", "decode": "#66bb6a"}


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
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
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")
    return fig


def block_table_map(snapshot: Snapshot, color_by: str = "physical", max_seqs: int = 32) -> Figure:
    """Every sequence's block table: row = sequence, column = logical block, cell = the physical block it maps
    to, coloured by its physical id, its refcount, whether it is shared, or whether the prefix cache holds it."""
    seqs = [s for s in snapshot.seqs if s.block_table][:max_seqs]
    width = max((len(s.block_table) for s in seqs), default=1)
    physical = np.full((max(len(seqs), 1), width), np.nan)
    for row, seq in enumerate(seqs):
        physical[row, :len(seq.block_table)] = seq.block_table
    held = ~np.isnan(physical)
    ids = np.where(held, physical, 0).astype(int)
    ref_count = np.array([b.ref_count for b in snapshot.blocks] or [0])[ids]
    cached = np.array([b.cached for b in snapshot.blocks] or [False])[ids]

    fig = Figure(figsize=(min(max(6.0, 2.5 + 0.42 * width), 12), min(1.2 + 0.34 * max(len(seqs), 2), 9)),
                 layout="constrained")
    ax = fig.subplots()
    if color_by == "physical":
        image = ax.imshow(physical, cmap="viridis", vmin=0, vmax=max(ids.max(), 1), aspect="auto")
        fig.colorbar(image, ax=ax, label="physical block id")
    elif color_by == "refcount":
        top = max(int(ref_count.max()), 2)
        cmap = matplotlib.colormaps["Oranges"].resampled(top + 1)
        cmap = ListedColormap(cmap(np.arange(1, top + 1)))
        image = ax.imshow(np.where(held, ref_count, np.nan), cmap=cmap,
                          norm=BoundaryNorm(np.arange(0.5, top + 1.5), cmap.N), aspect="auto")
        fig.colorbar(image, ax=ax, label="refcount", ticks=range(1, top + 1))
    elif color_by in ("shared", "cached"):
        flag = ref_count > 1 if color_by == "shared" else cached
        colors = {"shared": ("#b0bec5", "#e65100"), "cached": ("#b0bec5", "#1565c0")}[color_by]
        ax.imshow(np.where(held, flag, np.nan), cmap=ListedColormap(colors), vmin=0, vmax=1, aspect="auto")
        labels = {"shared": ("private", "shared (refcount > 1)"),
                  "cached": ("not in the prefix cache", "in the prefix cache")}[color_by]
        ax.legend(handles=[Patch(color=c, label=label) for c, label in zip(colors, labels)],
                  loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    else:
        raise ValueError(f"color_by must be 'physical', 'refcount', 'shared' or 'cached', got {color_by!r}")
    if width <= 32 and len(seqs) <= 32:
        for row, col in zip(*np.nonzero(held)):
            ax.text(col, row, str(ids[row, col]), ha="center", va="center", fontsize=7, color="white",
                    path_effects=[withStroke(linewidth=1.5, foreground="black")])
    ax.set_yticks(range(len(seqs)),
                  [f"{s.request_id}/{s.seq_index} ({s.num_computed_tokens} tok)" for s in seqs] or [""])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("logical block (position // block size)")
    ax.set_title(f"block tables at step {snapshot.step} ({snapshot.allocator}, {snapshot.block_size} tokens "
                 "per block)")
    return fig


def _memory_image(snapshot: Snapshot, columns: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """RGBA picture of the physical blocks (row-major), and the (row, col) of every shared block."""
    owner_index = {}
    for seq in snapshot.seqs:
        owner_index.setdefault(seq.request_id, len(owner_index))
    rows = math.ceil(snapshot.num_blocks / columns)
    image = np.ones((rows, columns, 4))
    shared = []
    for block in snapshot.blocks:
        row, col = divmod(block.block_id, columns)
        if block.owners:
            request_id = block.owners[0].split("/")[0]
            alpha = 0.2 + 0.8 * block.filled / snapshot.block_size
            image[row, col] = (*OWNER_COLORS[owner_index[request_id] % len(OWNER_COLORS)], alpha)
        else:
            image[row, col] = (*to_rgb(CACHED_FREE_COLOR if block.cached else FREE_COLOR), 1.0)
        if block.ref_count > 1:
            shared.append((row, col))
    return image, shared


def physical_memory_map(snapshots, columns: int = 64) -> Figure:
    """The physical blocks, one cell each, coloured by the request that owns them; a pale cell is allocated but
    holds few or no tokens yet. Several snapshots (say, the static arena and the paged pool) go side by side."""
    snapshots = _named(snapshots)
    pictures = {name: _memory_image(snap, columns) for name, snap in snapshots.items()}
    rows = max(image.shape[0] for image, _ in pictures.values())
    fig, axes = _panels(len(snapshots), width=6.0, height=1.4 + 5.0 * rows / columns)
    for ax, (name, snap) in zip(axes, snapshots.items()):
        image, shared = pictures[name]
        ax.imshow(image, aspect="equal", interpolation="nearest")
        if shared:
            ax.scatter([c for _, c in shared], [r for r, _ in shared], s=4, c="black", marker="o")
        usage = snap.usage
        ax.set_title(f"{name or snap.allocator}: step {snap.step}, {usage['usage']:.0%} of blocks taken,\n"
                     f"{usage['utilization']:.0%} of their slots hold tokens", fontsize="medium")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{snap.num_blocks} blocks of {snap.block_size} slots, {columns} per row")
    legend = [Patch(color=OWNER_COLORS[0], label="owned, full"),
              Patch(color=(*OWNER_COLORS[0], 0.3), label="owned, mostly empty"),
              Patch(color=FREE_COLOR, label="free"), Patch(color=CACHED_FREE_COLOR, label="free, prefix cached")]
    if any(shared for _, shared in pictures.values()):
        legend.append(axes[0].scatter([], [], s=6, c="black", label="shared (refcount > 1)"))
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize="small")
    return fig


def sharing_savings(runs: dict) -> Figure:
    """KV slots holding tokens vs the slots the same sequences would need without sharing, over time."""
    fig, axes = _panels(len(runs), sharey=True)
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
    axes[0].set_ylabel("KV slots")
    axes[0].legend(fontsize="small")
    return fig


# --- batching and throughput ------------------------------------------------------------------------------------
def _step_start_times(timeline: pd.DataFrame) -> pd.Series:
    return (timeline["time"] - timeline["duration"]).set_axis(timeline["step"])


def batching_timeline(run, max_requests: int = 40, title: str = "") -> Figure:
    """Top: each request's life — waiting, prefill, decode — with its preemptions. Bottom: how many requests
    are running, waiting and swapped out at every step."""
    requests = run.requests.dropna(subset=["first_scheduled", "first_token", "finished"]).copy()
    requests["order"] = requests["request_id"].astype(int)
    requests = requests.sort_values(["arrival", "order"])
    # An even sample across the arrival order, so late requests (the ones that wait and get preempted) show too.
    requests = requests.iloc[np.unique(np.linspace(0, len(requests) - 1, max_requests).round().astype(int))]
    fig = Figure(figsize=(10, 3 + 0.11 * len(requests)), layout="constrained")
    gantt, queues = fig.subplots(2, 1, sharex=True, height_ratios=[max(len(requests), 8) / 8, 1.2])
    for y, r in enumerate(requests.itertuples()):
        spans = {"waiting": (r.arrival, r.first_scheduled), "prefill": (r.first_scheduled, r.first_token),
                 "decode": (r.first_token, r.finished)}
        for state, (start, end) in spans.items():
            gantt.broken_barh([(start, end - start)], (y - 0.4, 0.8), color=STATE_COLORS[state])
    rows = {rid: y for y, rid in enumerate(requests["request_id"])}
    preempted = run.events[run.events["kind"] == "request_preempted"] if len(run.events) else run.events
    if len(preempted):
        preempted = preempted[preempted["request"].isin(rows)]
        starts = _step_start_times(run.timeline)
        for mode, marker, color in (("recompute", "x", "#b71c1c"), ("swap", "v", "#6a1b9a")):
            hits = preempted[preempted["mode"] == mode]
            if len(hits):
                gantt.scatter(starts.reindex(hits["step"]).to_numpy(), hits["request"].map(rows), marker=marker,
                              color=color, s=28, zorder=3, label=f"preempted ({mode})")
    gantt.set_ylim(len(requests) - 0.5, -0.5)
    gantt.set_yticks([])
    gantt.set_ylabel(f"{len(requests)} of {len(run.requests)} requests, by arrival")
    gantt.legend(handles=[Patch(color=c, label=s) for s, c in STATE_COLORS.items()]
                 + gantt.get_legend_handles_labels()[0], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    gantt.set_title(title or "batching timeline")
    tl = run.timeline
    for column, color in (("num_running", "#2e7d32"), ("num_waiting", "#9e9e9e"), ("num_swapped", "#6a1b9a")):
        queues.plot(tl["time"], tl[column], drawstyle="steps-post", color=color, label=column[4:])
    queues.set_ylabel("requests")
    queues.set_xlabel("simulated seconds")
    queues.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return fig


def tokens_per_second(timeline: pd.DataFrame, bins: int = 40, time: str = "time") -> tuple[np.ndarray, np.ndarray]:
    """Generated tokens per second in `bins` equal slices of the run: (slice centres, rates)."""
    edges = np.linspace(0, max(timeline[time].max(), 1e-9), bins + 1)
    tokens, _ = np.histogram(timeline[time], edges, weights=timeline["num_generated_tokens"])
    return (edges[:-1] + edges[1:]) / 2, tokens / np.diff(edges)


def throughput_latency(runs) -> Figure:
    """Left: output tokens per second over the run; a dotted line marks the last admission, where the steady
    rate ends and the drain tail begins. Right: each request's latency per output token, at the time it finished
    (the vLLM paper's normalized latency)."""
    runs = _named(runs)
    fig, (rate_ax, latency_ax) = _panels(2)
    for name, run in runs.items():
        centres, rates = tokens_per_second(run.timeline)
        label = (f"{name}: {steady_throughput(run):,.0f} tok/s steady, "
                 f"{run.summary['throughput_output_tokens_per_s']:,.0f} overall").lstrip(": ")
        line, = rate_ax.plot(centres, rates, label=label)
        rate_ax.axvline(run.requests["first_scheduled"].max(), color=line.get_color(), ls=":", lw=1)
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


def capacity_vs_utilization(capacity: pd.DataFrame) -> Figure:
    """KV capacity in tokens against gpu_memory_utilization, one line per column of `capacity` (its index: the
    utilizations), on a log scale; a line stops where nothing is left for the KV cache."""
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    for column in capacity:
        ax.plot(capacity.index, capacity[column].where(capacity[column] > 0), marker="o", ms=3, label=column)
    ax.set(xlabel="gpu_memory_utilization", ylabel="KV cache (tokens)", yscale="log")
    ax.legend(fontsize="small")
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
