#!/usr/bin/env python
"""Run notebooks/07_live.ipynb top to bottom with nbclient on a GPU machine, move the dashboard's
gpu_memory_utilization during the live run, and save the dashboard's figure (throughput, queues, KV use, the
NVML panel) and the executed notebook.

    python scripts/run_live_on_gpu.py --out DIR [--utilization 0.2 --moved-to 0.1 --seconds 25]

The extra cells it appends wait while the engine runs, pin the first run, move the control (a restart with the
new setting), wait again and save DIR/live_dashboard_<card>.png and the GPU panel's HTML.
"""
import argparse
import os
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--utilization", type=float, default=0.2, help="gpu_memory_utilization of the first run")
    parser.add_argument("--moved-to", type=float, default=0.1, help="where the control is moved during the run")
    parser.add_argument("--seconds", type=float, default=25.0, help="how long each setting runs before the next")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    path = ROOT / "notebooks" / "07_live.ipynb"
    notebook = nbformat.read(path, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
        f"RUN_SECONDS = {3 * args.seconds + 30:g}\nGPU_MEMORY_UTILIZATION = {args.utilization}"))
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in (
        f"import time\ntime.sleep({args.seconds})",
        f"dashboard.pin()\ndashboard.memory.value = {args.moved_to}   # moved during the run: a restart",
        f"time.sleep({args.seconds})",
        "import torch\ncard = torch.cuda.get_device_name().split()[-1].lower()\n"
        f"saved = dashboard.save_figures({str(args.out.resolve())!r}, f'live_dashboard_{{card}}')\n"
        "print(saved)\nprint(dashboard.live.marks)\nprint(dashboard.gpu_frame().describe().to_string())\n"
        "print(dashboard.gpu.value)")]
    started = time.monotonic()

    def progress(cell, cell_index, **_) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] cell {cell_index} done: {cell.source.splitlines()[:1]}",
              flush=True)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", on_cell_executed=progress,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    print(f"07_live.ipynb ran top to bottom in {time.monotonic() - started:.0f} s")
    for cell in notebook.cells[-4:]:
        for output in cell.get("outputs", []):
            print(output.get("text", ""))
    nbformat.write(notebook, args.out / "07_live_executed.ipynb")


if __name__ == "__main__":
    os.environ.pop("PAGEDLAB_SMOKE", None)
    main()
