"""`pagedlab profile --model DIR --out data/profiles/NAME.json`: measure this machine for the simulator.

Builds the engine as `LLM(DIR, ...)` serves it (CUDA graphs on a GPU) and times its model runner over a grid of
decode, prefill and mixed steps, block moves and a short real run (pagedlab/sim/profiler.py says what and why).
`pagedlab sim --profile NAME.json` then prices every simulated step with these measurements.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from pagedlab.engine.arg_utils import add_engine_args, engine_kwargs

# The engine settings a profile depends on (the engine's own flags, its names, types and help).
PROFILED_SETTINGS = {"dtype", "device", "block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "gpu_memory_utilization", "cpu_kv_cache_space", "swap_space", "enforce_eager", "kv_cache_dtype",
                     "quantization", "seed"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, help="the profile JSON to write, e.g. data/profiles/h200-llama-3-8b.json")
    p.add_argument("--name", help="the profile's name (default: <card>-<model shape>)")
    p.add_argument("--model-name", help="the model shape's name (default: a known shape by its dimensions, else "
                                        "the directory's name)")
    p.add_argument("--host-requests", type=int, default=300, help="requests of the real run that times the host")
    p.add_argument("--host-max-output", type=int, default=96, help="output tokens per request of that run, at most")
    p.add_argument("--host-rate", type=float, default=10.0,
                   help="requests/s of the small-batch part of that run (Poisson; 0: leave it out)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per grid cell, after a discarded first run "
                                                          "(the median is kept, their min/max recorded)")
    # A profile's grid runs up to max_model_len, and its swap bandwidth needs only a little swap space.
    add_engine_args(p, "profile", only=PROFILED_SETTINGS, defaults={"max_model_len": 2048, "swap_space": 1.0})


def run(args) -> int:
    from pagedlab.engine.llm import build_engine
    from pagedlab.sim import profiler

    engine = build_engine(args.model, **engine_kwargs(args))
    result = profiler.profile(engine, name=args.name, model_name=args.model_name, host_requests=args.host_requests,
                              host_max_output=args.host_max_output, host_rate=args.host_rate, repeats=args.repeats,
                              command="pagedlab profile " + shlex.join(sys.argv[2:] if len(sys.argv) > 2 else []))
    profiler.save(result, args.out)
    print(summary(result))
    print(f"wrote {args.out}")
    return 0


def summary(result: dict) -> str:
    fit, check = result["fit_report"], result["validation"]
    return (f"{result['name']}: {result['card']['name']}, {result['model']['name']} in {result['duration_s']} s\n"
            f"  fit residuals (mean |error|): decode {fit['decode']['mean_abs_pct']}%, prefill/mixed "
            f"{fit['eager']['mean_abs_pct']}%; host {fit['host']['mean_ms']} ms a step on average\n"
            f"  real-run check of the runner model: decode {check['decode'].get('total_bias_pct')}% total, "
            f"other steps {check['eager'].get('total_bias_pct')}% total, all {check['all'].get('total_bias_pct')}%")
