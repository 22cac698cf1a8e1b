"""Simulator runs with everything the lab's figures need: per-step timeline, per-request rows, request events,
and snapshots of memory at a chosen step."""
from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd

from pagedlab import events as ev
from pagedlab.core.snapshot import Snapshot
from pagedlab.sim.simulator import SimConfig, Simulator
from pagedlab.sim.workloads import TraceRequest, load_trace


@dataclass
class SimRun:
    config: SimConfig
    summary: dict
    timeline: pd.DataFrame     # one row per step: StepStats + mem_* accounting
    requests: pd.DataFrame     # one row per finished request: lengths and timings
    events: pd.DataFrame       # REQUEST_EVENTS as the engine's bus published them


def simulate(config: SimConfig, trace: list[TraceRequest] | None = None) -> SimRun:
    sim = Simulator(config, trace)
    recorder = ev.Recorder(sim.engine.bus, ev.REQUEST_EVENTS)     # no figure needs a row per block
    result = sim.run()
    recorder.close()
    return SimRun(config, result.summary, result.timeline(), result.request_frame(), recorder.dataframe())


def compare_runs(base: SimConfig, **variants: dict) -> dict[str, SimRun]:
    """The same trace under several configs: compare_runs(cfg, paged={}, static={"allocator": "static"})."""
    trace = load_trace(base.workload, base.num_requests, base.seed, base.request_rate)
    return {name: simulate(replace(base, **changes), trace) for name, changes in variants.items()}


def snapshot_at(config: SimConfig, step: int, trace: list[TraceRequest] | None = None) -> Snapshot:
    """Every block table and block of the simulated engine after `step` steps."""
    sim = Simulator(config, trace)
    sim.run(max_steps=step)
    return sim.engine.snapshot()


def summary_table(runs: dict[str, SimRun], keys: dict[str, str]) -> pd.DataFrame:
    """Chosen summary figures side by side: keys maps a summary key to the row label."""
    return pd.DataFrame({name: {label: run.summary.get(key) for key, label in keys.items()}
                         for name, run in runs.items()})


def steady_window_end(run: SimRun) -> float:
    """When the drain tail begins: the first step after the last admission at which fewer than half as many
    sequences run as typically ran while requests were still being admitted."""
    tl = run.timeline
    admitted = run.requests["first_scheduled"].max()
    filling = tl.loc[tl["time"] <= admitted, "num_running_seqs"]
    typical = filling.median() if len(filling) else tl["num_running_seqs"].max()
    thin = tl[(tl["time"] > admitted) & (tl["num_running_seqs"] < typical / 2)]
    return float(thin["time"].iloc[0]) if len(thin) else float(tl["time"].iloc[-1])


def steady_throughput(run: SimRun) -> float:
    """Output tokens per second before the drain tail (see `steady_window_end`): the few long requests that
    finish alone at the end say little about a setting, yet decide the overall rate of a short run."""
    if not len(run.requests) or not len(run.timeline):
        return 0.0
    end = steady_window_end(run)
    tl = run.timeline
    return float(tl.loc[tl["time"] <= end, "num_generated_tokens"].sum() / end) if end > 0 else 0.0
