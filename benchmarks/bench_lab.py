"""How fast the lab's figures answer a control: every notebook's main view, redrawn over a sweep of control
positions (simulation, drawing and the PNG the browser gets, all included), as a learner's slider does.

    .venv/bin/python benchmarks/bench_lab.py --out benchmarks/results/lab_redraw.json

Reports the median and max redraw time per notebook, wall and CPU seconds, and writes them, with the machine
and its load, to --out. The target: a simulator-backed redraw answers within 1 s on a 2-core CPU. On a shared
machine the wall time counts the other jobs too; the CPU time is the redraw's own.
"""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from pagedlab import lab
from pagedlab.lab.block_size import BLOCK_SIZES, memory_sweep, prefix_reuse
from pagedlab.sim.simulator import SimConfig


def positions(control, count: int = 6) -> list:
    """`count` values across a control's range (its options, or min..max), skipping its current value."""
    if hasattr(control, "options") and control.options:
        values = [option[1] if isinstance(option, tuple) else option for option in control.options]
        picks = [values[int(i)] for i in np.linspace(0, len(values) - 1, count).round()]
    else:
        picks = list(np.linspace(control.min, control.max, count))
        if isinstance(control.value, int):
            picks = [int(round(v)) for v in picks]
    return [v for v in dict.fromkeys(picks) if v != control.value]


class Clock:
    """Wall seconds and this process's CPU seconds of one redraw. On a shared machine (other jobs on its cores)
    the wall time grows with the load; the CPU time is what the redraw costs, what it takes on an idle machine."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_explorer(explorer, name: str) -> list[Clock]:
    """The explorers: redraw(**{control: value}) draws and renders the PNG."""
    clocks = []
    for value in positions(explorer.controls[explorer.main_control]):
        with Clock() as clock:
            explorer.redraw(**{explorer.main_control: value})
        clocks.append(clock)
    return clocks


def time_controls(control) -> list[Clock]:
    """Set a widget's value: its observers rerun and redraw, setting the PNGs of their Image widgets."""
    clocks = []
    for value in positions(control):
        with Clock() as clock:
            control.value = value
        clocks.append(clock)
    return clocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    timings = {}
    timings["01_fragmentation"] = time_explorer(lab.FragmentationExplorer(num_requests=100, time=8.0), "01")
    engine, _, _ = lab.block_table_engine(4, 64)
    player = lab.BlockTablePlayer(engine)
    from pagedlab.sampling_params import SamplingParams
    player.run(["In the beginning God created", "Blessed are"], SamplingParams(temperature=0, max_tokens=24,
                                                                               ignore_eos=True))
    timings["02_block_tables"] = time_explorer(player, "02")
    timings["03_sharing"] = time_explorer(lab.SharingExplorer(system_prompt=24, n=1, block_size=4, step=2), "03")
    timings["04_batching"] = time_explorer(lab.BatchingExplorer(num_requests=60, kv_gib=0.5, request_rate=10.0),
                                           "04")
    timings["05_memory_budget"] = time_explorer(lab.BudgetExplorer(), "05")
    runs = memory_sweep(SimConfig(num_requests=300, kv_gib=4.0, profile="h200-llama-3-8b"))
    kernel, card = lab.kernel_block_size_sweep(list(BLOCK_SIZES))
    block_size = lab.BlockSizeExplorer(runs, kernel, card, prefix_reuse())
    timings["06_block_size"] = time_explorer(block_size, "06")
    playground = lab.SimPlayground(num_requests=100)      # its redraw sets its Image widgets' PNGs itself
    timings["07_live (playground)"] = (
        time_controls(playground.controls["gpu_memory_utilization"]) + time_controls(playground.controls["block_size"]))

    rows = {}
    for name, clocks in timings.items():
        wall, cpu = [c.wall for c in clocks], [c.cpu for c in clocks]
        rows[name] = {"redraws": len(clocks), "median_s": round(statistics.median(wall), 3),
                      "max_s": round(max(wall), 3), "cpu_median_s": round(statistics.median(cpu), 3),
                      "cpu_max_s": round(max(cpu), 3)}
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} on {os.cpu_count()} cores (wall times grow with it; CPU times do not)")
    print(f"{'notebook':24s} {'redraws':>7s} {'median s':>9s} {'max s':>7s} {'cpu median':>11s} {'cpu max':>8s}")
    for name, row in rows.items():
        print(f"{name:24s} {row['redraws']:7d} {row['median_s']:9.3f} {row['max_s']:7.3f} "
              f"{row['cpu_median_s']:11.3f} {row['cpu_max_s']:8.3f}")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), "
                         f"{platform.system()}, Python {platform.python_version()}; no GPU",
              "command": "python benchmarks/bench_lab.py --out benchmarks/results/lab_redraw.json",
              "load_average_1min": round(load[0], 1), "target_s": 1.0, "notebooks": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
