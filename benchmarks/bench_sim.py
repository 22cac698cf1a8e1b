"""Simulator speed (requests simulated per minute on one core) and what the event bus costs.

    python benchmarks/bench_sim.py --out benchmarks/results

Runs each configuration `--repeats` times and reports the median wall time: with nobody subscribed, with a
subscriber that does nothing, and with a Recorder keeping every event.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedlab.events import Recorder  # noqa: E402
from pagedlab.sim.simulator import SimConfig, Simulator  # noqa: E402
from pagedlab.sim.workloads import load_trace  # noqa: E402


def timed_run(config: SimConfig, trace, listener: str) -> float:
    sim = Simulator(config, trace)
    if listener == "noop":
        sim.engine.bus.subscribe(lambda event: None)
    elif listener == "recorder":
        Recorder(sim.engine.bus)
    start = time.perf_counter()
    sim.run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    for workload in ("sharegpt", "alpaca"):
        trace = load_trace(workload, args.num_requests)
        for listener in ("none", "noop", "recorder"):
            config = SimConfig(workload=workload, num_requests=args.num_requests, timeline=False)
            times = [timed_run(config, trace, listener) for _ in range(args.repeats)]
            median = statistics.median(times)
            rows.append({"workload": workload, "listener": listener, "median_seconds": median,
                         "requests_per_minute": args.num_requests / median * 60})
    base = {r["workload"]: r["median_seconds"] for r in rows if r["listener"] == "none"}
    for r in rows:
        r["overhead_vs_none"] = r["median_seconds"] / base[r["workload"]] - 1
    print(f"{'workload':10s} {'listener':10s} {'median s':>9s} {'requests/min':>13s} {'overhead':>9s}")
    for r in rows:
        print(f"{r['workload']:10s} {r['listener']:10s} {r['median_seconds']:9.2f} {r['requests_per_minute']:13,.0f} "
              f"{r['overhead_vs_none']:9.1%}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sim_speed.json"), "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "command": " ".join(["python"] + sys.argv), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
