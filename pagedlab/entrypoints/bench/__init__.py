"""`pagedlab bench` (cli.py): pagedlab against transformers and a roofline bound on one GPU, one concept a module:
workload (what runs), shapes (the random-weight models), roofline (the bound), engine_runs (pagedlab's runs, seen
through its STEP events), step_split (where a step's time goes), hf (the transformers baselines), checks (the GPU
path against transformers), report (ratios, targets, table, chart). The names benchmarks/ scripts use are here."""
from pagedlab.entrypoints.bench.cli import main
from pagedlab.entrypoints.bench.common import free_memory, log
from pagedlab.entrypoints.bench.engine_runs import warm_up_pagedlab
from pagedlab.entrypoints.bench.shapes import PAD_ID, SHAPES, build_random_checkpoint
from pagedlab.entrypoints.bench.workload import make_workload
from pagedlab.sim.profiler import versions

__all__ = ["PAD_ID", "SHAPES", "build_random_checkpoint", "free_memory", "log", "main", "make_workload", "versions",
           "warm_up_pagedlab"]
