"""`pagedlab bench`: offline throughput of pagedlab against Hugging Face transformers, in one process.

One random-weight model (a real model's shape, built with transformers' `from_config` and saved, so every system
runs the very same weights) and one or more workloads (random: 256 requests, prompts of 64-512 random tokens, 128
output tokens each; sharegpt: 1000 ShareGPT-like requests; long: 32 x U[8k, 16k] -> 256; EOS ignored) go through:
  pagedlab                     `LLM(dir).generate(...)`: paged KV cache, continuous batching, CUDA graphs; run
                               twice on the workload (first and second run: what startup left to compile shows)
  transformers_generate        `model.generate` in static batches, left-padded; the best of a batch-size sweep
  transformers_generate_batch  `model.generate_batch`: transformers' own continuous batching (timed after its warm-up)
and are held to a roofline bound measured on the same GPU in the same run: prefill FLOPs at the bf16 matmul rate,
plus, per decode step, the weights and every running sequence's KV read once at the copy bandwidth. pagedlab's
latency (TTFT, inter-token) is measured at a fixed Poisson request rate, and a decode step is split into its host
phases (schedule, prepare, forward, sample, update: the engine's STEP events) and device time; the second run's
workload runs once more with async scheduling switched the other way, so the report gives a decode step's period
and its exposed host time (period less device time) with async scheduling on and off. Writes
`throughput_<shape>.json` (random) or `throughput_<shape>_<workload>.json`, and a `.png` beside each, to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

from pagedlab.engine.arg_utils import add_engine_args, engine_kwargs
from pagedlab.entrypoints.bench.common import free_memory, gib, log
from pagedlab.entrypoints.bench.shapes import SHAPES
from pagedlab.entrypoints.bench.workload import WORKLOADS

SYSTEMS = ("pagedlab", "hf-generate", "hf-generate-batch")
DEFAULT_RATES = {"llama-3.2-1b": 64.0, "llama-3-8b": 16.0, "tiny": 32.0}   # requests/s for the latency run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--model", default=None, help="an existing HF checkpoint directory instead of random weights")
    p.add_argument("--workload", default="random",
                   help=f"comma-separated, of {', '.join(WORKLOADS)}: random prompts U[--input-len] with "
                        "--output-len each, the ShareGPT-like trace of data/traces, or long contexts; each runs at "
                        "its own max_model_len (2048; long: 20480) unless --max-model-len is given")
    p.add_argument("--num-requests", type=int, default=None,
                   help="default: the workload's (" + ", ".join(f"{w.name} {w.num_requests}"
                                                             for w in WORKLOADS.values()) + ")")
    p.add_argument("--input-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="prompt lengths, uniform (default: random 64 512, long 8192 16384)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens (default: random 128, long 256)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--hf-batch-sizes", default="32,64,128,256",
                   help="static batch sizes tried for transformers generate (the first batch of each is timed, "
                        "then the whole workload runs at the fastest)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="requests/s of the Poisson latency run (default: per shape, "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RATES.items()) + ")")
    p.add_argument("--latency-requests", type=int, default=128, help="requests in the latency run (0: skip it)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the device timing of a decode step (its host phases are always recorded)")
    p.add_argument("--no-warm-up", action="store_true",
                   help="no warm-up of the bench's own before the first run: it meets what engine startup left")
    p.add_argument("--ab-unfused", action="store_true",
                   help="after everything else, rerun pagedlab's throughput with the fused element-wise kernels off "
                        "(a child process with PAGEDLAB_FUSED_OPS=0): what pagedlab/layers/fused_ops.py is worth")
    p.add_argument("--check", action="store_true",
                   help="first check the GPU path: greedy tokens and logits against transformers (fp32, bf16), "
                        "CUDA graphs against eager")
    p.add_argument("--check-only", action="store_true", help="only the checks")
    p.add_argument("--out", default="out/bench", help="directory for the JSON and the PNG")
    add_engine_args(p, "bench")


def main(argv: list[str] | None = None, prog: str = "bench_throughput.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def attempt(fn):
    """fn(), or its error: one system failing must not lose the others."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def torch_dtype(name: str, device):
    """The dtype the random checkpoint is built in and every system runs: auto is bfloat16 on a GPU, float32 on
    a CPU (what the engine's auto gives for that checkpoint)."""
    import torch
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16",
                           "float": "float32"}.get(name, name))


def command_line() -> str:
    if os.path.basename(sys.argv[0]) in ("pagedlab", "__main__.py", "cli.py"):
        return "pagedlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def run(args: argparse.Namespace) -> int:
    import torch

    from pagedlab.entrypoints.bench import workload as workloads
    from pagedlab.entrypoints.bench.checks import run_checks
    from pagedlab.entrypoints.bench.roofline import measure_ceilings
    from pagedlab.entrypoints.bench.shapes import build_random_checkpoint, load_hf
    from pagedlab.models.loader import load_hf_config, resolve_device
    from pagedlab.sim.profiler import versions

    device = resolve_device(args.device)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    names = [w.strip() for w in args.workload.split(",") if w.strip()]
    for label, chosen, known in (("system", systems, SYSTEMS), ("workload", names, WORKLOADS)):
        if set(chosen) - set(known):
            raise SystemExit(f"unknown {label}(s) {sorted(set(chosen) - set(known))}; choose from {', '.join(known)}")
    specs = [workloads.resolve(n, args.num_requests, args.input_len, args.output_len) for n in names]
    os.makedirs(args.out, exist_ok=True)
    dtype = torch_dtype(args.dtype, device)
    shape = "custom" if args.model else args.shape
    header = {"command": command_line(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              **versions(), "shape": shape, "dtype": str(dtype).replace("torch.", ""), "seed": args.seed,
              "fused_ops": os.environ.get("PAGEDLAB_FUSED_OPS", "1") != "0"}

    if args.check or args.check_only:
        log("checks of the GPU path")
        header["checks"] = checks = attempt(lambda: run_checks(device, args.seed))
        checks.setdefault("ok", False)
        if args.check_only:
            with open(os.path.join(args.out, "throughput_checks.json"), "w") as f:
                json.dump(header, f, indent=2, default=str)
            print(json.dumps(checks, indent=1, default=str))
            return 0 if checks["ok"] else 1

    log(f"ceilings on {header['gpu']}")
    ceilings = measure_ceilings(device)
    log(f"  copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {ceilings['matmul_flops_per_s'] / 1e12:.0f} "
        "TFLOP/s")
    tmp_root = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 40 * 2**30 else None
    model_dir = args.model or tempfile.mkdtemp(prefix="pagedlab-bench-", dir=tmp_root)
    hf_model = None
    try:
        start = time.perf_counter()
        if args.model:
            hf_config = load_hf_config(args.model)
            if any(s != "pagedlab" for s in systems):
                hf_model = load_hf(args.model, dtype, device)
        else:
            hf_model = build_random_checkpoint(args.shape, model_dir, dtype, device, args.seed)
            hf_config = hf_model.config
            if systems == ["pagedlab"]:
                hf_model = None
                free_memory()
        log(f"model ready in {time.perf_counter() - start:.1f} s ({model_dir})")
        for spec in specs:
            bench_workload(args, spec, header, ceilings, model_dir, hf_config, hf_model, systems, dtype, device)
    finally:
        del hf_model
        if not args.model:
            shutil.rmtree(model_dir, ignore_errors=True)
    return 0


def bench_workload(args, spec: dict, header: dict, ceilings: dict, model_dir: str, hf_config, hf_model,
                   systems: list[str], dtype, device) -> dict:
    """Every system on one workload; the report is saved after each step (a crash keeps what ran)."""
    import torch

    from pagedlab.entrypoints.bench import engine_runs, hf, report as reports
    from pagedlab.entrypoints.bench.roofline import roofline
    from pagedlab.entrypoints.bench.shapes import model_dims
    from pagedlab.entrypoints.bench.step_split import step_split
    from pagedlab.entrypoints.bench.workload import make_workload, workload_stats

    dims = model_dims(hf_config)
    max_model_len = min(args.max_model_len or spec["max_model_len"], hf_config.max_position_embeddings)
    work_args = argparse.Namespace(**spec, seed=args.seed)
    work = make_workload(work_args, dims["vocab"], max_model_len)
    second_work = make_workload(work_args, dims["vocab"], max_model_len, seed=1)
    kwargs = dict(engine_kwargs(args), dtype=str(dtype).replace("torch.", ""), device=str(device),
                  max_model_len=max_model_len)
    report = {**header, "systems": {}, "ratios": {}, "targets": {}, "model": dims,
              "workload": {"name": spec["workload"], "max_model_len": max_model_len, **workload_stats(work)},
              "ceilings": ceilings,
              "roofline": roofline(work, dims, ceilings, args.max_num_seqs,
                                   dtype_bytes=torch.empty(0, dtype=dtype).element_size())}
    suffix = "" if spec["workload"] == "random" else f"_{spec['workload']}"
    json_path = os.path.join(args.out, f"throughput_{report['shape']}{suffix}.json")

    def save() -> None:
        reports.finalize(report)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2, default=str)

    log(f"workload {spec['workload']}: {len(work)} requests; roofline bound {report['roofline']['bound_s']:.3f} s = "
        f"{report['roofline']['output_tokens_per_s']:,.0f} output tok/s")
    save()
    if "pagedlab" in systems:
        # The transformers model stays on the GPU (it runs next): pagedlab's memory profile counts it as used, so
        # its KV cache is smaller than alone, and its own peak is reported net of it.
        log("pagedlab: first and second run")
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        held = {}

        def pagedlab() -> dict:
            result, held["steps"], held["llm"] = engine_runs.run_pagedlab(
                model_dir, work, second_work, kwargs, device, dims["vocab"], warm_up=not args.no_warm_up)
            if device.type == "cuda":
                result["other_resident_gib"] = gib(resident)
                result["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated(device) - resident)
            return result
        report["systems"]["pagedlab"] = ours = attempt(pagedlab)
        save()
        llm = held.pop("llm", None)
        if llm is not None:
            log(f"  first run {ours['first_run']['output_tokens_per_s']:,.0f} output tok/s, second "
                f"{ours['second_run']['output_tokens_per_s']:,.0f}")
            runner = llm.llm_engine.executor
            periods = {mode: run["decode_period_ms"] for mode, run in ours.get("scheduling_ab", {}).items()}
            report["profile"] = attempt(lambda: step_split(held.pop("steps"), runner,
                                                           None if args.no_profile else device, periods))
            save()
            if args.latency_requests:
                rate = args.request_rate or DEFAULT_RATES.get(report["shape"], 16.0)
                log(f"pagedlab latency at {rate:g} req/s")
                report["latency"] = attempt(lambda: engine_runs.run_latency(llm, work, rate, args.latency_requests,
                                                                            args.seed))
                save()
        del llm
        free_memory()
    if "hf-generate" in systems:
        log("transformers generate, static batches")
        sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
        report["systems"]["transformers_generate"] = attempt(lambda: hf.run_hf_generate(hf_model, work, sizes,
                                                                                         device))
        free_memory()
        save()
    if "hf-generate-batch" in systems:
        log("transformers generate_batch (continuous batching)")
        report["systems"]["transformers_generate_batch"] = attempt(lambda: hf.run_hf_generate_batch(hf_model, work,
                                                                                                    device))
        free_memory()
        save()
    if args.ab_unfused and "pagedlab" in systems:
        log("pagedlab with the fused element-wise kernels off (a child process)")
        report["ab_unfused"] = attempt(lambda: engine_runs.run_unfused(model_dir, work, kwargs))
        save()
    try:
        reports.plot(report, json_path[:-len(".json")] + ".png")
    except Exception as exc:  # noqa: BLE001
        log(f"plot failed: {exc}")
    print_summary(report)
    log(f"wrote {json_path}")
    return report


def print_summary(report: dict) -> None:
    from pagedlab.entrypoints.bench.report import summarize

    latency = report.get("latency", {})
    if "ttft_s" in latency:
        ttft, itl = latency["ttft_s"], latency["inter_token_latency_s"]
        log(f"latency at {latency['request_rate']:g} req/s: TTFT p50 {ttft.get('p50', 0) * 1e3:.1f} ms p99 "
            f"{ttft.get('p99', 0) * 1e3:.1f} ms; ITL p50 {itl.get('p50', 0) * 1e3:.2f} ms p99 "
            f"{itl.get('p99', 0) * 1e3:.2f} ms")
    profile = report.get("profile", {})
    if "graph_replay_ms" in profile:
        log(f"decode step device time: graph replay {json.dumps(profile['graph_replay_ms'])}; logits+argmax "
            f"{profile.get('logits_argmax_ms')} ms; exposed host {profile.get('decode_exposed_host_ms')} ms")
    print(summarize(report), flush=True)
