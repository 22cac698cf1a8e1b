"""The lab: figures, widgets and a live dashboard over the engine and the simulator.

The only part of pagedlab that imports matplotlib and ipywidgets (the `lab` extra); `import pagedlab` never
loads it. In a notebook: `from pagedlab import lab`, then `lab.fragmentation_stack(...)`, `lab.SimPlayground()`.
"""
from pagedlab.lab.budget import card_kv_budget, kv_shape, sim_config_for
from pagedlab.lab.kernel_sweep import kernel_block_size_sweep
from pagedlab.lab.dashboard import LiveDashboard, live_figure
from pagedlab.lab.exercises import exercise
from pagedlab.lab.gpu import gpu_panel_html, gpu_status
from pagedlab.lab.live import LiveEngine
from pagedlab.lab.models import lab_model, lab_model_dir
from pagedlab.lab.runs import SimRun, compare_runs, simulate, snapshot_at, steady_throughput, summary_table
from pagedlab.lab.views import (batching_timeline, block_size_tradeoff, block_table_map, capacity_vs_utilization,
                                fragmentation_stack, memory_budget_bars, physical_memory_map,
                                sharing_savings, throughput_latency, waste_bars)
from pagedlab.lab.sizing import BudgetExplorer, min_utilization
from pagedlab.lab.widgets import SimPlayground

__all__ = [
    "card_kv_budget", "exercise", "kv_shape", "sim_config_for", "kernel_block_size_sweep", "LiveDashboard", "LiveEngine",
    "gpu_panel_html", "gpu_status", "lab_model", "lab_model_dir", "SimRun", "compare_runs", "simulate",
    "snapshot_at", "steady_throughput", "summary_table", "batching_timeline", "block_size_tradeoff", "block_table_map", "capacity_vs_utilization",
    "fragmentation_stack", "live_figure", "memory_budget_bars", "physical_memory_map", "sharing_savings",
    "throughput_latency", "waste_bars", "SimPlayground", "BudgetExplorer", "min_utilization",
]
