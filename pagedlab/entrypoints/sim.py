"""`pagedlab sim`: a workload through the real scheduler and allocators with no model (pagedlab/sim/), on the paged
allocator, the static one or both side by side. The engine flags it takes are the settings the simulator models
(the fields SimConfig shares with the engine's configs)."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields

from pagedlab.engine.arg_utils import add_engine_args, engine_kwargs, flag_names

# Sim's own flags, not the engine's: --allocator also takes "both", --model names a shape from the cost model.
OWN_FLAGS = ("allocator", "model")


def sim_engine_fields() -> set[str]:
    """The engine flags sim takes: the settings SimConfig shares with the engine's configs, less its own."""
    from pagedlab.sim.simulator import SimConfig
    return ({f.name for f in fields(SimConfig)} & flag_names()) - set(OWN_FLAGS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pagedlab.sim.cost_model import MODEL_SHAPES
    from pagedlab.sim.workloads import WORKLOADS

    p.add_argument("--workload", default="sharegpt", help=f"one of {', '.join(WORKLOADS)}, or a .jsonl trace")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default: all at 0)")
    p.add_argument("--allocator", choices=["paged", "static", "both"], default="both")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--kv-tokens", type=int, help="KV budget in token slots")
    budget.add_argument("--kv-gib", type=float, default=4.0, help="KV budget in GiB of the model shape's KV")
    p.add_argument("--model", default=None, choices=sorted(MODEL_SHAPES),
                   help="shape for bytes and cost (default: the profile's, else llama-3-8b)")
    p.add_argument("--profile", help="a GPU profile (path, or a shipped name such as h200-llama-3-8b): measured step "
                                     "times; without one the generic roofline model estimates them")
    p.add_argument("--json", metavar="FILE", help="write every figure and the per-step timeline here")
    add_engine_args(p, "sim", only=sim_engine_fields())


def run(args: argparse.Namespace) -> int:
    from pagedlab.sim.simulator import SimConfig, Simulator
    from pagedlab.sim.workloads import load_trace

    allocators = ["paged", "static"] if args.allocator == "both" else [args.allocator]
    base = dict(engine_kwargs(args, exclude=OWN_FLAGS), workload=args.workload, num_requests=args.num_requests,
                request_rate=args.request_rate, kv_tokens=args.kv_tokens,
                kv_gib=None if args.kv_tokens else args.kv_gib, model=args.model, profile=args.profile)
    trace = load_trace(args.workload, args.num_requests, args.seed, args.request_rate)
    results = {a: Simulator(SimConfig(allocator=a, **base), trace).run() for a in allocators}
    print(f"cost model: {next(iter(results.values())).summary['cost_model']}")
    print(format_summaries({a: r.summary for a, r in results.items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({a: r.to_json() for a, r in results.items()}, f, default=_json_default)
        print(f"wrote {args.json}")
    return 0


def _json_default(value):
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


ROWS = [
    ("requests finished", "finished", "{:d}"), ("rejected", "rejected", "{:d}"),
    ("KV capacity (tokens)", "kv_capacity_tokens", "{:d}"),
    ("memory utilization (tokens / allocated)", "memory_utilization", "{:.1%}"),
    ("  cache share: tokens", "mean_tokens_fraction", "{:.1%}"),
    ("  cache share: internal fragmentation", "mean_internal_fraction", "{:.1%}"),
    ("  cache share: reserved, unused", "mean_reserved_fraction", "{:.1%}"),
    ("  cache share: external fragmentation", "mean_external_fraction", "{:.1%}"),
    ("  cache share: free", "mean_free_fraction", "{:.1%}"),
    ("  saved by sharing", "mean_shared_saved_fraction", "{:.1%}"),
    ("peak running sequences", "peak_running_seqs", "{:d}"), ("mean running sequences", "mean_running_seqs", "{:.1f}"),
    ("preemptions", "preemptions", "{:d}"), ("blocks swapped out", "swapped_out_blocks", "{:d}"),
    ("prefix cache hit rate", "prefix_cache_hit_rate", "{:.1%}"),
    ("simulated time (s)", "simulated_seconds", "{:.1f}"),
    ("throughput (requests/s)", "throughput_requests_per_s", "{:.2f}"),
    ("throughput (output tokens/s)", "throughput_output_tokens_per_s", "{:.0f}"),
    ("mean / p99 TTFT (s)", ("mean_ttft_s", "p99_ttft_s"), "{:.2f} / {:.2f}"),
    ("mean inter-token latency (s)", "mean_itl_s", "{:.4f}"),
    ("simulator speed (requests/min)", "sim_requests_per_minute", "{:,.0f}"),
]


def format_summaries(summaries: dict[str, dict]) -> str:
    names = list(summaries)
    lines = [f"{'':42s}" + "".join(f"{n:>18s}" for n in names)]
    for label, key, fmt in ROWS:
        cells = []
        for n in names:
            s = summaries[n]
            try:
                cells.append(fmt.format(*(s[k] for k in key)) if isinstance(key, tuple) else fmt.format(s[key]))
            except (KeyError, ValueError):
                cells.append("-")
        lines.append(f"{label:42s}" + "".join(f"{c:>18s}" for c in cells))
    if len(names) == 2 and all("throughput_output_tokens_per_s" in summaries[n] for n in names):
        a, b = (summaries[n] for n in names)
        ratio = a["throughput_output_tokens_per_s"] / max(b["throughput_output_tokens_per_s"], 1e-12)
        lines.append(f"{names[0]} / {names[1]} throughput: {ratio:.2f}x; concurrency: "
                     f"{a.get('mean_running_seqs', 0) / max(b.get('mean_running_seqs', 0), 1e-12):.2f}x")
    return "\n".join(lines)
