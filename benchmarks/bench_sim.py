"""Simulator speed (requests simulated per minute on one core) and what the event bus costs.

    python benchmarks/bench_sim.py --out benchmarks/results

Runs each configuration once untimed (the first run in a process pays one-time costs: the heap growing from the OS,
the interpreter warming up its specialized code) and then `--repeats` times, and reports the median wall time and
the median CPU time of the process, for the ShareGPT-like and the Alpaca-like trace: the paged and the static
allocator as `pagedlab sim` runs them (a timeline row per step), the paged one without the timeline, stepping every
step (fast_forward=False: what the decode runs save), and with listeners on the event bus: a Recorder of request
events (what the lab's figures use), one that does nothing with every event and a Recorder keeping every event
(listening for step or block events turns decode runs off, since a run does not replay them). With nobody
subscribed an event costs only its `if bus.enabled:` guard; the guard's share of the run is estimated as (events
the run would emit) x (time of one guard check, timeit) / (run time of the stepping run).

Simulator.run pauses the cyclic garbage collector itself (a run makes no cycles), so the bench leaves `gc` alone:
it times what a user of `pagedlab sim` gets. On a shared machine the wall time counts the waits for a core other
processes hold; the CPU time does not (the load average at the start and the end is recorded with the figures).
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


def timed_run(config: SimConfig, trace, listener: str) -> tuple[float, float, int]:
    sim = Simulator(config, trace)
    events = [0]
    if listener == "noop":
        sim.engine.bus.subscribe(lambda event: events.__setitem__(0, events[0] + 1))
    elif listener == "recorder":
        Recorder(sim.engine.bus)
    elif listener == "requests":
        Recorder(sim.engine.bus, REQUEST_EVENTS)
    start, cpu = time.perf_counter(), time.process_time()
    sim.run()
    return time.perf_counter() - start, time.process_time() - cpu, events[0]


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

    rows, load_at_start = [], os.getloadavg()
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
            timed_run(config, trace, listener)      # warm-up, untimed
            runs = [timed_run(config, trace, listener) for _ in range(args.repeats)]
            median, cpu = statistics.median(t for t, _, _ in runs), statistics.median(c for _, c, _ in runs)
            rows.append({"workload": workload, "variant": name, "median_seconds": median,
                         "requests_per_minute": args.num_requests / median * 60, "median_cpu_seconds": cpu,
                         "requests_per_cpu_minute": args.num_requests / cpu * 60,
                         "seconds": [t for t, _, _ in runs], "events": runs[0][2]})
    base = {r["workload"]: r["median_seconds"] for r in rows if r["variant"] == "paged, stepping"}
    events = {r["workload"]: r["events"] for r in rows if r["variant"] == "paged, no-op listener"}
    guard = guard_seconds()
    guard_share = {w: events[w] * guard / base[w] for w in base}
    load_at_end = os.getloadavg()
    print(f"load average (1, 5, 15 min): {load_at_start[0]:.2f} {load_at_start[1]:.2f} {load_at_start[2]:.2f} at the "
          f"start, {load_at_end[0]:.2f} {load_at_end[1]:.2f} {load_at_end[2]:.2f} at the end ({os.cpu_count()} cores)")
    print(f"{'workload':10s} {'variant':24s} {'median s':>9s} {'requests/min':>13s} {'cpu s':>6s} {'per cpu-min':>12s}")
    for r in rows:
        print(f"{r['workload']:10s} {r['variant']:24s} {r['median_seconds']:9.2f} {r['requests_per_minute']:13,.0f} "
              f"{r['median_cpu_seconds']:6.2f} {r['requests_per_cpu_minute']:12,.0f}")
    for w, share in guard_share.items():
        print(f"{w}: {events[w]:,} events; unsubscribed guards cost ~{events[w] * guard * 1e3:.1f} ms "
              f"({share:.2%} of the run, {guard * 1e9:.0f} ns each)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sim_speed.json"), "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                       "python": platform.python_version(), "command": " ".join(["python"] + sys.argv),
                       "load_average": {"start": load_at_start, "end": load_at_end}, "repeats": args.repeats,
                       "warm_up_runs": 1, "rows": rows, "guard_ns": guard * 1e9, "guard_share_of_run": guard_share},
                      f, indent=2)


if __name__ == "__main__":
    main()
