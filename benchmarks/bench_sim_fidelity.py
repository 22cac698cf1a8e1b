"""Simulator fidelity on a GPU: the real engine and `pagedlab sim --profile` on the same traces and configuration.

    PYTHONPATH=. python benchmarks/bench_sim_fidelity.py --shape llama-3.2-1b --out benchmarks/results \\
        --profile-out data/profiles/h200-llama-3.2-1b.json
    PYTHONPATH=. python benchmarks/bench_sim_fidelity.py --shape llama-3-8b --scale 0.5 --out benchmarks/results \\
        --profile-out data/profiles/h200-llama-3-8b.json
    PYTHONPATH=. python benchmarks/bench_sim_fidelity.py --shape tiny --device cpu --dtype float32 --max-model-len 256 \\
        --max-num-seqs 16 --scale 0.05 --out out/fidelity      # CPU smoke test of the script

One process: a random-weight checkpoint of the shape (built as `pagedlab bench` builds it), the engine as `LLM`
serves it (CUDA graphs, KV cache sized from memory), `pagedlab profile` on it (or --profile FILE), then for each
trace a fresh engine on the same model runner and the simulator with the profile, the same configuration and KV
blocks (pagedlab/sim/fidelity.py measures both the same way). Traces: ShareGPT-like and Alpaca-like offline,
shared-prefix with prefix caching, an overload with a small KV budget (recompute preemptions), Poisson arrivals at
two rates. --scale shortens the traces (it is recorded). Writes sim_fidelity_<card>_<shape>.json after every trace.

The real engine runs each trace 1 + --repeats times (default 3), each on a fresh engine over the same runner, after
the startup warm-up compiled every kernel variant; the first run is discarded and each figure is the median of the
others, with its [min, max] in
`real_spread` and the Triton compiles that happened anyway in `triton_compiles_after_startup` (0 when sound).
The simulator is deterministic: one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedlab.sim import fidelity, profiler  # noqa: E402
from pagedlab.sim.profiled_cost import ProfiledCostModel  # noqa: E402
from pagedlab.sim.profiles import load_profile  # noqa: E402
from pagedlab.sim.simulator import SimConfig  # noqa: E402
from pagedlab.sim.workloads import make_trace  # noqa: E402

RATES = {"llama-3.2-1b": (20.0, 60.0), "llama-3-8b": (8.0, 20.0), "tiny": (20.0, 60.0)}   # requests/s, Poisson
OVERLOAD_KV_TOKENS = 16384          # the small KV budget of the overload trace: ~a tenth of what its batch wants


def scenarios(shape: str, scale: float) -> list[dict]:
    """name, workload, requests, rate, prefix caching, KV tokens (None: the engine's whole cache)."""
    low, high = RATES.get(shape, RATES["tiny"])
    n = lambda count: max(8, round(count * scale))  # noqa: E731
    return [
        dict(name="sharegpt", workload="sharegpt", requests=n(1000), rate=math.inf),
        dict(name="alpaca", workload="alpaca", requests=n(1000), rate=math.inf),
        dict(name="shared_prefix_cached", workload="shared_prefix", requests=n(1000), rate=math.inf,
             prefix_caching=True),
        dict(name="overload_small_kv", workload="sharegpt", requests=n(200), rate=math.inf,
             kv_tokens=OVERLOAD_KV_TOKENS),
        dict(name=f"poisson_{low:g}rps", workload="sharegpt", requests=n(200), rate=low),
        dict(name=f"poisson_{high:g}rps", workload="sharegpt", requests=n(300), rate=high),
    ]


def log(msg: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_scenario(engine, profile: dict, s: dict, repeats: int = 3) -> dict:
    from pagedlab.kernels import compile_guard
    block_size = engine.config.cache.block_size
    num_blocks = s["kv_tokens"] // block_size if s.get("kv_tokens") else None
    caching = s.get("prefix_caching", False)
    trace = make_trace(s["workload"], s["requests"], seed=0, request_rate=s["rate"])
    real, spread, real_engine = fidelity.run_real_repeated(engine, trace, repeats, discard=1, num_blocks=num_blocks,
                                                           enable_prefix_caching=caching)
    config = fidelity.sim_config(real_engine, profile, s["workload"], s["requests"], s["rate"], num_blocks, caching)
    sim = fidelity.run_sim(config, trace)
    err = fidelity.errors(real, sim)
    return {"trace": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in s.items()},
            "kv_blocks": real_engine.kv.num_blocks, "real": real, "real_spread": spread, "real_runs": repeats,
            "real_runs_discarded": 1,
            "triton_compiles_after_startup": compile_guard.compiles_after_startup(), "sim": sim, "error": err,
            "within_target": fidelity.within_targets(err)}


def table(results: dict) -> str:
    head = (f"{'trace':24s} {'tok/s real':>11s} {'sim':>9s} {'err':>7s}  {'TTFT real':>10s} {'sim':>8s} {'err':>7s}  "
            f"{'p99 TTFT err':>12s}  {'ITL real ms':>11s} {'sim':>7s} {'err':>7s}  {'preempt real/sim':>16s}")
    lines = [head]
    for name, r in results.items():
        if "error" not in r or not isinstance(r["error"], dict):
            lines.append(f"{name:24s} FAILED: {r.get('error')}")
            continue
        real, sim, err = r["real"], r["sim"], r["error"]
        lines.append(
            f"{name:24s} {real['output_tokens_per_s']:11,.0f} {sim['output_tokens_per_s']:9,.0f} "
            f"{err['output_tokens_per_s']:+7.1%}  {real['mean_ttft_s']:10.3f} {sim['mean_ttft_s']:8.3f} "
            f"{err['mean_ttft_s']:+7.1%}  {err['p99_ttft_s']:+12.1%}  {1e3 * real['mean_itl_s']:11.2f} "
            f"{1e3 * sim['mean_itl_s']:7.2f} {err['mean_itl_s']:+7.1%}  "
            f"{real['preemptions']:>8d}/{sim['preemptions']:<7d}")
    return "\n".join(lines)


def resimulate(path: str, profile_path: str) -> int:
    """The simulator's side again, from a results file and a profile (no GPU): after a change to the cost model,
    the real engine's measurements stay and the errors are recomputed."""
    with open(path) as f:
        report = json.load(f)
    profile = load_profile(profile_path)
    for name, r in report["scenarios"].items():
        if "real" not in r:
            continue
        t = r["trace"]
        rate = math.inf if t["rate"] is None else t["rate"]
        config = SimConfig(workload=t["workload"], num_requests=t["requests"], request_rate=rate,
                           block_size=report["engine"]["block_size"],
                           kv_tokens=r["kv_blocks"] * report["engine"]["block_size"], kv_gib=None,
                           max_model_len=report["engine"]["max_model_len"],
                           max_num_seqs=report["engine"]["max_num_seqs"],
                           max_num_batched_tokens=report["engine"]["max_num_batched_tokens"],
                           enable_prefix_caching=t.get("prefix_caching", False), profile=profile, timeline=False)
        r["sim"] = fidelity.run_sim(config, make_trace(t["workload"], t["requests"], seed=0, request_rate=rate))
        r["error"] = fidelity.errors(r["real"], r["sim"])
        r["within_target"] = fidelity.within_targets(r["error"])
    report["profile_fit"] = ProfiledCostModel(profile).fit_report
    report["resimulated"] = "sim side recomputed with: python benchmarks/bench_sim_fidelity.py --resimulate " \
        f"{path} --profile {profile_path}"
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=lambda v: None)
    print(f"{report['card']}, {report['shape']}, profile {report['profile']} (sim side recomputed)")
    print(table(report["scenarios"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    from pagedlab.entrypoints.bench import SHAPES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--model", help="an existing HF checkpoint directory instead of random weights")
    p.add_argument("--profile", help="an existing profile (skip profiling)")
    p.add_argument("--profile-out", help="where to write the profile measured here")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of each trace's requests (shorter runs)")
    p.add_argument("--only", help="comma-separated trace names to run")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--host-requests", type=int, default=300)
    p.add_argument("--host-rate", type=float, default=10.0, help="Poisson rate of the profile's small-batch run")
    p.add_argument("--repeats", type=int, default=3, help="real-engine runs per trace (each figure: their median)")
    p.add_argument("--out", default="out/fidelity")
    p.add_argument("--resimulate", metavar="RESULTS", help="recompute the simulator's side of a results file with "
                                                           "--profile (no GPU, no engine run)")
    args = p.parse_args(argv)
    if args.resimulate:
        return resimulate(args.resimulate, args.profile)

    import torch

    from pagedlab import LLM
    from pagedlab.entrypoints.bench import build_random_checkpoint, free_memory, warm_up_pagedlab

    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model_dir, built = args.model, False
    if model_dir is None:
        model_dir, built = tempfile.mkdtemp(prefix="pagedlab-fidelity-"), True
        log(f"building a random {args.shape} checkpoint in {model_dir}")
        build_random_checkpoint(args.shape, model_dir, getattr(torch, args.dtype), device, 0)   # saved, then dropped
        free_memory()
    kwargs = dict(dtype=args.dtype, device=str(device), max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  gpu_memory_utilization=args.gpu_memory_utilization, swap_space=1.0, cpu_kv_cache_space=0.25)
    llm = LLM(model_dir, **kwargs)
    engine = llm.llm_engine
    warm_up_pagedlab(llm, engine.vocab_size)        # no Triton compilation inside a timed run
    shape = args.shape if args.model is None else os.path.basename(os.path.normpath(model_dir))
    if args.profile:
        profile = load_profile(args.profile)
    else:
        log("profiling")
        profile = profiler.profile(engine, model_name=shape, host_requests=args.host_requests, host_rate=args.host_rate,
                                   command="python benchmarks/bench_sim_fidelity.py " + shlex.join(sys.argv[1:]))
        log(f"profiled in {profile['duration_s']} s: fit {json.dumps(profile['fit_report'])}; "
            f"check on a real run {json.dumps(profile['validation'])}")
        if args.profile_out:
            profiler.save(profile, args.profile_out)
            log(f"wrote {args.profile_out}")
    card = profiler.card_info(device)
    report = {"card": card["name"], "shape": shape, "dtype": args.dtype, "profile": profile["name"],
              "profile_fit": profile["fit_report"], "profile_check": profile["validation"],
              "versions": profiler.versions(), "engine": profile["engine"], "scale": args.scale,
              "targets": fidelity.TARGETS, "repeats": args.repeats, "command": "python benchmarks/bench_sim_fidelity.py "
              + shlex.join(sys.argv[1:] if argv is None else argv), "scenarios": {}}
    path = os.path.join(args.out, f"sim_fidelity_{card['short']}_{shape}.json")
    wanted = set(args.only.split(",")) if args.only else None
    for s in scenarios(shape, args.scale):
        if wanted and s["name"] not in wanted:
            continue
        log(f"{s['name']}: {s['requests']} {s['workload']} requests")
        try:
            report["scenarios"][s["name"]] = r = run_scenario(engine, profile, s, args.repeats)
            log(f"{s['name']}: real {r['real']['wall_s']:.1f} s, sim {r['sim']['wall_s']:.1f} s; errors "
                + ", ".join(f"{k} {v:+.1%}" if k != "preemptions" else f"{k} {v:+d}" for k, v in r["error"].items()))
        except Exception as exc:  # noqa: BLE001 - one failing trace must not lose the others
            import traceback
            report["scenarios"][s["name"]] = {"error": f"{type(exc).__name__}: {exc}",
                                              "traceback": traceback.format_exc()}
            log(f"{s['name']} FAILED: {exc}")
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=lambda v: None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{card['name']}, {shape} ({args.dtype}), profile {profile['name']}; targets: "
          + ", ".join(f"{k} within {v:.0%}" for k, v in fidelity.TARGETS.items()))
    print(table(report["scenarios"]))
    print(f"wrote {path}")
    if built:
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
