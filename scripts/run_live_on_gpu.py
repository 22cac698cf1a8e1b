#!/usr/bin/env python
"""Run notebooks/07_live.ipynb top to bottom with nbclient, move the dashboard's memory control during the live run,
and save the dashboard's figure (throughput, queues, KV use, the NVML panel), its GPU panel, a JSON summary of the
runs, all named after the card (and, with --executed, the executed notebook):

    python scripts/run_live_on_gpu.py [--out benchmarks/results] [--utilization 0.2 --moved-to 0.1 --seconds 25]

Through `device`, carry the Jupyter wheels the machine lacks (nbclient, ipykernel, ipywidgets and their
dependencies) and put them on PYTHONPATH: the kernel nbclient starts inherits it.

On a GPU the control is gpu_memory_utilization (--utilization, then --moved-to). Without one it is the KV cache's
size in MiB, and it moves to half its starting value (a CPU rehearsal of the GPU run; the files say "cpu").

Cells appended after the notebook's own: wait while the engine runs, pin the first run, move the control (a
restart with the new setting), wait again, save. Each cell's finishing time is printed as it goes.
"""
import argparse
import os
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]

SAVE = """\
import json, torch
from pagedlab.lab.dashboard import run_summaries
from pagedlab.lab.models import model_label
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
stem = "live_dashboard_" + card.split()[-1].lower()
saved = dashboard.save_figures({out!r}, stem)
runs = [dict(run=r["run"], setting=r["label"], steady_tokens_per_s=round(r["steady"], 1), steps=len(r["rows"]))
        for r in run_summaries(dashboard.live.frame(), dashboard.live.marks)]
gpu = dashboard.gpu_frame()
summary = dict(card=card, model=model_label(dashboard.live.model), runs=runs, nvml_samples=len(gpu),
               max_memory_used_gib=round(float(gpu["memory_used"].max()) / 2**30, 2) if len(gpu) else None,
               max_gpu_utilization=int(gpu["gpu_utilization"].max()) if len(gpu) else None,
               error=dashboard.live.error, reproduce="python scripts/run_live_on_gpu.py")
saved.append(saved[0].with_suffix(".json"))
saved[-1].write_text(json.dumps(summary, indent=1) + "\\n")
dashboard.close()
print(json.dumps(summary, indent=1))
print("saved:", *saved)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--utilization", type=float, default=0.2, help="gpu_memory_utilization of the first run")
    parser.add_argument("--moved-to", type=float, default=0.1, help="where the control is moved during the run")
    parser.add_argument("--seconds", type=float, default=25.0, help="how long each setting runs before the next")
    parser.add_argument("--executed", type=Path, help="also write the executed notebook here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    path = ROOT / "notebooks" / "07_live.ipynb"
    notebook = nbformat.read(path, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
        f"RUN_SECONDS = {3 * args.seconds + 30:g}\nGPU_MEMORY_UTILIZATION = {args.utilization}"))
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in (
        f"import time\ntime.sleep({args.seconds})",
        "dashboard.pin()\n"
        f"dashboard.memory.value = {args.moved_to} if dashboard.on_gpu else round(dashboard.memory.value / 2)"
        "   # moved during the run: a restart\nprint(dashboard.status.value)",
        f"time.sleep({args.seconds})",
        SAVE.format(out=str(args.out.resolve())))]
    started = time.monotonic()

    def progress(cell, cell_index, **_) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] cell {cell_index} done: {cell.source.splitlines()[:1]}",
              flush=True)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", on_cell_executed=progress,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    print(f"07_live.ipynb ran top to bottom in {time.monotonic() - started:.0f} s")
    for cell in notebook.cells[-3:]:
        for output in cell.get("outputs", []):
            print(output.get("text", ""))
    if args.executed:
        nbformat.write(notebook, args.executed)


if __name__ == "__main__":
    os.environ.pop("PAGEDLAB_SMOKE", None)
    main()
