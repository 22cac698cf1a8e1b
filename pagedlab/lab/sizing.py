"""The memory budget, explored: one card's memory split by the startup arithmetic (weights, activations, memory
outside torch, KV cache, the headroom gpu_memory_utilization leaves), on a linear GiB axis with the
utilization's own scale above it, and the KV capacity in tokens against the utilization, with the line
max_model_len must clear. A slider moves the utilization; the engine's own max_model_len error appears, live,
when the cache gets too small."""
from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from pagedlab.config import ConfigError
from pagedlab.engine.llm import kv_budget_line
from pagedlab.engine.llm_engine import check_kv_capacity, format_bytes
from pagedlab.lab.budget import CARDS, GiB, card_kv_budget
from pagedlab.lab.explorer import STYLE, Explorer, slider_layout
from pagedlab.sim.cost_model import MODEL_SHAPES

BUDGET_PARTS = {"weights": ("weights", "#546e7a"), "peak_activation": ("peak activations", "#ffb74d"),
                "non_torch": ("outside torch", "#a1887f"), "kv_cache": ("KV cache", "#2e7d32"),
                "headroom": ("headroom (1 - gpu_memory_utilization)", "#eeeeee")}
UTILIZATIONS = np.round(np.arange(0.05, 0.951, 0.05), 2)


def budget_parts(report: dict) -> dict[str, float]:
    """The card's bytes by part; they sum to the card (a KV cache below zero is drawn as none)."""
    parts = {part: max(float(report[part]), 0.0) for part in ("weights", "peak_activation", "non_torch", "kv_cache")}
    parts["headroom"] = report["total"] - sum(parts.values())
    return parts


def min_utilization(model: str, card_gib: float, max_model_len: int, block_size: int = 16, **budget) -> float:
    """The smallest gpu_memory_utilization whose KV cache holds one max_model_len request, by the same
    arithmetic: (weights + activations + outside torch + the request's blocks) / total."""
    report = card_kv_budget(model, card_gib, 1.0, block_size, **budget)
    need = -(-max_model_len // block_size) * report["bytes_per_block"]
    fixed = report["weights"] + report["peak_activation"] + report["non_torch"]
    return (fixed + need) / report["total"]


def budget_figure(report: dict, max_model_len: int) -> Figure:
    """Top: the card split into its parts at this utilization. Bottom: KV capacity in tokens at every
    utilization, the chosen one marked, and the max_model_len one request needs."""
    fig = Figure(figsize=(10, 6.2), layout="constrained")
    bar_ax, cap_ax = fig.subplots(2, 1, height_ratios=[1, 2.2])
    total = report["total"] / GiB
    left = 0.0
    for part, size in budget_parts(report).items():
        label, color = BUDGET_PARTS[part]
        bar_ax.barh([0], [size / GiB], left=left, color=color, edgecolor="white", label=f"{label}: {size / GiB:.1f} GiB")
        left += size / GiB
    bar_ax.axvline(total * report["gpu_memory_utilization"], color="black", lw=1.5)
    bar_ax.set(xlim=(0, total), yticks=[], xlabel="GiB of the card",
               title=f"{report['model']} on {report['device']} ({total:g} GiB) at gpu_memory_utilization "
                     f"{report['gpu_memory_utilization']:.2f}")
    share = bar_ax.secondary_xaxis("top", functions=(lambda gib: gib / total, lambda u: u * total))
    share.set_xticks(np.round(np.arange(0, 1.01, 0.1), 1))
    share.set_xticks(np.arange(0, 1.01, 0.05), minor=True)
    share.set_xlabel(f"gpu_memory_utilization: each 0.05 is {0.05 * total:.2f} GiB")
    bar_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.3), fontsize="small")

    curve = capacity_frame(report)
    block_size = report["block_size"]
    cap_ax.plot(curve.index, curve["tokens"], marker="o", ms=3, color="#2e7d32", label="KV cache (tokens)")
    cap_ax.axhline(max_model_len, color="#c62828", ls="--",
                   label=f"max_model_len {max_model_len:,}: one request must fit")
    lowest = min_utilization(report["model"], total, max_model_len, block_size,
                             kv_cache_dtype=report["kv_cache_dtype"])
    if lowest <= 1:
        cap_ax.axvspan(0, lowest, color="#ffcdd2", alpha=0.5, label=f"refuses to start (below {lowest:.3f})")
    tokens = report["num_gpu_blocks"] * block_size
    cap_ax.plot([report["gpu_memory_utilization"]], [tokens], marker="o", ms=10, color="black", ls="none",
                label=f"now: {tokens:,} tokens")
    cap_ax.set(xlim=(0, 1), ylim=(0, max(curve["tokens"].max(), max_model_len) * 1.08),
               xlabel="gpu_memory_utilization", ylabel="KV cache (tokens)",
               title=f"KV capacity: {report['bytes_per_block'] // block_size // 1024} KiB per token, so each 0.05 "
                     f"of the card is {0.05 * report['total'] / (report['bytes_per_block'] / block_size):,.0f} "
                     "tokens")
    cap_ax.set_xticks(np.round(np.arange(0, 1.01, 0.1), 1))
    cap_ax.set_xticks(np.arange(0, 1.01, 0.05), minor=True)
    cap_ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    cap_ax.grid(alpha=0.3)
    cap_ax.legend(loc="upper left", fontsize="small")
    return fig


def capacity_frame(report: dict) -> pd.DataFrame:
    """KV tokens at every utilization from 0.05 to 0.95 for the report's card and model."""
    gib, size = report["total"] / GiB, report["block_size"]
    tokens = [card_kv_budget(report["model"], gib, u, size, report["kv_cache_dtype"])["num_gpu_blocks"] * size
              for u in UTILIZATIONS]
    return pd.DataFrame({"tokens": tokens}, index=pd.Index(UTILIZATIONS, name="gpu_memory_utilization"))


def budget_status(report: dict, max_model_len: int) -> str:
    """The startup line and what the cache holds, or the engine's own error when one request does not fit."""
    try:
        check_kv_capacity(report["num_gpu_blocks"], report["block_size"], max_model_len, report["bytes_per_block"])
    except ConfigError as exc:
        return f"<span style='color:#b71c1c'><b>ConfigError:</b> {html.escape(str(exc))}</span>"
    tokens = report["num_gpu_blocks"] * report["block_size"]
    return (f"<code>{html.escape(kv_budget_line(report))}</code><br>KV cache {format_bytes(report['kv_cache'])} = "
            f"{report['num_gpu_blocks']:,} blocks of {report['block_size']} tokens = <b>{tokens:,} tokens</b>: "
            f"room for {tokens // max_model_len:,} requests of max_model_len {max_model_len:,} at once "
            "(a static allocator's limit), and many more of their actual lengths when paged")


class BudgetExplorer(Explorer):
    """Card, model shape, gpu_memory_utilization, max_model_len and the KV dtype as controls over
    `budget_figure`; `figure` is the last one drawn and `status` says what the cache holds or why it fails."""

    main_control = "gpu_memory_utilization"

    def __init__(self, model: str = "llama-3-8b", card_gib: float = 80, gpu_memory_utilization: float = 0.9,
                 max_model_len: int = 8192, block_size: int = 16) -> None:
        self.block_size = block_size
        super().__init__({
            "model": widgets.Dropdown(options=list(MODEL_SHAPES), value=model, description="model shape",
                                      style=STYLE),
            "card_gib": widgets.Dropdown(options=[(f"{n} ({g:g} GiB)", g) for n, g in CARDS.items()],
                                         value=card_gib, description="GPU", style=STYLE),
            "kv_cache_dtype": widgets.ToggleButtons(options=["auto", "fp8"], description="kv_cache_dtype",
                                                    style=STYLE),
            "gpu_memory_utilization": widgets.FloatSlider(
                value=gpu_memory_utilization, min=0.05, max=0.95, step=0.05, description="gpu_memory_utilization",
                continuous_update=False, style=STYLE, layout=slider_layout("480px")),
            "max_model_len": widgets.SelectionSlider(
                options=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], value=max_model_len,
                description="max_model_len", continuous_update=False, style=STYLE, layout=slider_layout("480px")),
        })
        self.redraw()

    def report(self) -> dict:
        c = self.values()
        return card_kv_budget(c["model"], c["card_gib"], round(c["gpu_memory_utilization"], 2), self.block_size,
                              kv_cache_dtype=c["kv_cache_dtype"])

    def draw(self, max_model_len: int, **_) -> tuple[Figure, str]:
        report = self.report()
        return budget_figure(report, max_model_len), budget_status(report, max_model_len)
