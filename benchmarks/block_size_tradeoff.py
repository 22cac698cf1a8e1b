"""Block size: decode-kernel time (measured on the H100, benchmarks/results/block_size_sweep.csv) beside the KV
waste the simulator measures for a ShareGPT-like trace — one table and one plot.

    python benchmarks/block_size_tradeoff.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd  # noqa: E402

from pagedlab import lab  # noqa: E402
from pagedlab.sim.simulator import SimConfig  # noqa: E402
from pagedlab.sim.workloads import load_trace  # noqa: E402

BLOCK_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    base = SimConfig(workload="sharegpt", num_requests=args.num_requests, kv_gib=4.0)
    trace = load_trace(base.workload, base.num_requests)
    sweep = pd.DataFrame([{"block_size": b, **lab.simulate(replace(base, block_size=b), trace).summary}
                          for b in BLOCK_SIZES])
    kernel, source = lab.kernel_block_size_sweep(BLOCK_SIZES)
    table = sweep[["block_size", "memory_utilization", "mean_internal_fraction", "mean_running_seqs",
                   "throughput_output_tokens_per_s"]].merge(kernel, on="block_size")
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "block_size_tradeoff.csv"), index=False)
    lab.block_size_tradeoff(sweep, kernel, source).savefig(os.path.join(args.out, "block_size_tradeoff.png"), dpi=110)
    print(f"kernel times: {source}")
    print(table.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
