"""`pagedlab profile --model DIR --out data/profiles/NAME.json`: measure this machine for the simulator.

Builds the engine as `LLM(DIR, ...)` serves it (CUDA graphs on a GPU) and times its model runner over a grid of
decode, prefill and mixed steps, block moves and a short real run (pagedlab/sim/profiler.py says what and why).
`pagedlab sim --profile NAME.json` then prices every simulated step with these measurements.
"""
from __future__ import annotations

import argparse
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, help="the profile JSON to write, e.g. data/profiles/h200-llama-3-8b.json")
    p.add_argument("--name", help="the profile's name (default: <card>-<model shape>)")
    p.add_argument("--model-name", help="the model shape's name (default: a known shape by its dimensions, else "
                                        "the directory's name)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--cpu-kv-cache-space", type=float, default=0.5, help="GiB of KV cache on a CPU")
    p.add_argument("--swap-space", type=float, default=1.0, help="GiB of CPU swap (for the swap bandwidth)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (profile the engine run so)")
    p.add_argument("--host-requests", type=int, default=300, help="requests of the real run that times the host")
    p.add_argument("--host-max-output", type=int, default=96, help="output tokens per request of that run, at most")
    p.add_argument("--host-rate", type=float, default=10.0,
                   help="requests/s of the small-batch part of that run (Poisson; 0: leave it out)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per grid cell, after a discarded first run "
                                                          "(the median is kept, their min/max recorded)")
    p.add_argument("--seed", type=int, default=0)


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, device=args.device, block_size=args.block_size, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_space=args.cpu_kv_cache_space,
                swap_space=args.swap_space, enforce_eager=args.enforce_eager, seed=args.seed)


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
