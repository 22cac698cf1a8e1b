"""Simulator speed (requests simulated per minute on one core) and what the event bus costs.

    python benchmarks/bench_sim.py --out benchmarks/results

Runs each configuration `--repeats` times and reports the median wall time, for the ShareGPT-like and the
Alpaca-like trace: the paged and the static allocator as `pagedlab sim` runs them (a timeline row per step), the
paged one without the timeline, stepping every step (fast_forward=False: what the decode runs save), and with
listeners on the event bus: a Recorder of request events (what the lab's figures use), one that does nothing with
every event and a Recorder keeping every event (listening for step or block events turns decode runs off, since
a run does not replay them). With nobody subscribed an event costs only its `if bus.enabled:` guard;
the guard's share of the run is estimated as (events the run would emit) x (time of one guard check, timeit) /
(run time of the stepping run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedlab.events import REQUEST_EVENTS, EventBus, Recorder  # noqa: E402
from pagedlab.sim.simulator import SimConfig, Simulator  # noqa: E402
from pagedlab.sim.workloads import load_trace  # noqa: E402


def timed_run(config: SimConfig, trace, listener: str) -> tuple[float, int]:
    sim = Simulator(config, trace)
    events = [0]
    if listener == "noop":
        sim.engine.bus.subscribe(lambda event: events.__setitem__(0, events[0] + 1))
    elif listener == "recorder":
        Recorder(sim.engine.bus)
    elif listener == "requests":
        Recorder(sim.engine.bus, REQUEST_EVENTS)
    start = time.perf_counter()
    sim.run()
    return time.perf_counter() - start, events[0]


def guard_seconds() -> float:
    """One `if bus.enabled:` check on an engine's bus that nobody listens to."""
    bus = EventBus()
    number = 2_000_000
    return timeit.timeit("if bus.enabled: pass", globals={"bus": bus}, number=number) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    variants = {            # name -> (SimConfig changes, listener)
        "paged": ({}, "none"), "static": ({"allocator": "static"}, "none"),
        "paged, no timeline": ({"timeline": False}, "none"),
        "paged, stepping": ({"fast_forward": False}, "none"),
        "paged, request Recorder": ({}, "requests"),
        "paged, no-op listener": ({}, "noop"), "paged, Recorder": ({}, "recorder"),
    }
    for workload in ("sharegpt", "alpaca"):
        trace = load_trace(workload, args.num_requests)
        for name, (changes, listener) in variants.items():
            config = SimConfig(workload=workload, num_requests=args.num_requests, **changes)
            runs = [timed_run(config, trace, listener) for _ in range(args.repeats)]
            median = statistics.median(t for t, _ in runs)
            rows.append({"workload": workload, "variant": name, "median_seconds": median,
                         "requests_per_minute": args.num_requests / median * 60, "events": runs[0][1]})
    base = {r["workload"]: r["median_seconds"] for r in rows if r["variant"] == "paged, stepping"}
    events = {r["workload"]: r["events"] for r in rows if r["variant"] == "paged, no-op listener"}
    guard = guard_seconds()
    guard_share = {w: events[w] * guard / base[w] for w in base}
    print(f"{'workload':10s} {'variant':24s} {'median s':>9s} {'requests/min':>13s}")
    for r in rows:
        print(f"{r['workload']:10s} {r['variant']:24s} {r['median_seconds']:9.2f} {r['requests_per_minute']:13,.0f}")
    for w, share in guard_share.items():
        print(f"{w}: {events[w]:,} events; unsubscribed guards cost ~{events[w] * guard * 1e3:.1f} ms "
              f"({share:.2%} of the run, {guard * 1e9:.0f} ns each)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sim_speed.json"), "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                       "command": " ".join(["python"] + sys.argv), "rows": rows, "guard_ns": guard * 1e9,
                       "guard_share_of_run": guard_share}, f, indent=2)


if __name__ == "__main__":
    main()
