"""The lab: figures, widgets and a live dashboard over the engine and the simulator.

The only part of pagedlab that imports matplotlib and ipywidgets (the `lab` extra); `import pagedlab` never
loads it. In a notebook: `from pagedlab import lab`, then `lab.fragmentation_stack(...)`, `lab.SimPlayground()`.
"""
from pagedlab.lab.batching_explorer import BatchingExplorer
from pagedlab.lab.block_size import BlockSizeExplorer
from pagedlab.lab.block_tables import BlockTablePlayer, block_table_engine, block_tables_figure
from pagedlab.lab.budget import card_kv_budget, kv_shape, sim_config_for
from pagedlab.lab.dashboard import LiveDashboard, live_figure
from pagedlab.lab.explorer import exercise
from pagedlab.lab.fragmentation_explorer import FragmentationExplorer
from pagedlab.lab.gpu import gpu_panel_html, gpu_status
from pagedlab.lab.kernel_sweep import kernel_block_size_sweep
from pagedlab.lab.live import LiveEngine
from pagedlab.lab.models import lab_model, lab_model_dir
from pagedlab.lab.runs import SimRun, compare_runs, simulate, snapshot_at, steady_throughput, summary_table
from pagedlab.lab.sharing_explorer import SharingExplorer
from pagedlab.lab.sizing import BudgetExplorer, min_utilization
from pagedlab.lab.views import (batching_timeline, block_size_tradeoff, fragmentation_stack,
                                memory_budget_bars, sharing_savings, throughput_latency, waste_bars)
from pagedlab.lab.widgets import SimPlayground

__all__ = [
    "BatchingExplorer", "BlockSizeExplorer", "BlockTablePlayer", "block_table_engine", "block_tables_figure", "card_kv_budget", "kv_shape",
    "sim_config_for", "LiveDashboard", "live_figure", "exercise", "FragmentationExplorer", "gpu_panel_html",
    "gpu_status", "kernel_block_size_sweep", "LiveEngine", "lab_model", "lab_model_dir", "SimRun", "compare_runs",
    "simulate", "snapshot_at", "steady_throughput", "summary_table", "SharingExplorer", "BudgetExplorer",
    "min_utilization", "batching_timeline", "block_size_tradeoff", "fragmentation_stack",
    "memory_budget_bars", "sharing_savings", "throughput_latency", "waste_bars", "SimPlayground",
]
