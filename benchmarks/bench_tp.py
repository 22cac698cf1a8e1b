"""Tensor parallelism: throughput and per-GPU memory of each TP size side by side, and equal greedy tokens.

    PYTHONPATH=. python benchmarks/bench_tp.py --out DIR               # 2 GPUs: about 3 minutes
    PYTHONPATH=. python benchmarks/bench_tp.py --out DIR --shape llama-3-70b --tp-sizes 4,8 \
        --gpu-budget-gib 120 --input-len 64 512 --run-timeout 540      # 8 GPUs; --workload sharegpt too
    PYTHONPATH=. python benchmarks/bench_tp.py --out DIR --cpu-smoke   # tiny model, gloo on the CPU

A random-weight Llama-3-8B (bf16, 15 GiB of weights; --shape llama-3-70b: 131 GiB, which no single card holds)
runs the same offline workload (default: 256 requests of 512 random prompt tokens and 128 output tokens, EOS
ignored; `--input-len 64 512` draws prompt lengths from U[64, 512]; `--workload sharegpt` takes the lengths of
data/traces/sharegpt.jsonl) at each of --tp-sizes (default 1 and 2), with every card given
the same budget: --gpu-budget-gib of it (default 20, what a card shared with other work or a 24 GB card would give;
the gpu_memory_utilization passed is that over the card's total, so H100s and H200s get the same budget), or
--gpu-memory-utilization. TP=1 keeps the whole model on one card, so little of its budget is left for KV cache and
few requests run at once; TP=2 halves the weights and the KV bytes per token on each card.
A TP size that does not fit at all is a result: the JSON says so. The checkpoint is written tensor by tensor
(benchmarks/random_checkpoint.py), so no process ever holds the whole model; each rank loads only its shard onto its
GPU. Speedups are over the smallest TP size that ran. Each run then checks TP parity: greedy tokens of a tiny fp32
model, which must be equal at every TP size.

Every run is its own process (so per-GPU memory, read from nvidia-smi while the engine is up, is that run's alone),
and the checkpoint is written to a temporary directory, not to --out. Writes DIR/tp.json; a summary is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pagedlab.entrypoints.bench import SHAPES, free_memory, log, make_workload, versions, warm_up_pagedlab

PARITY_REQUESTS, PARITY_TOKENS = 16, 24
RUN_TIMEOUT_S = 240


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for tp.json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU over gloo: checks the script")
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES), help="random-weight model shape")
    p.add_argument("--model", default=None, help="an existing HF checkpoint instead of random weights")
    p.add_argument("--tp-sizes", default="1,2")
    p.add_argument("--gpu-budget-gib", type=float, default=20.0, help="of each card, for every TP size")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="instead of --gpu-budget-gib")
    p.add_argument("--workload", default="random", choices=["random", "sharegpt"])
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, nargs="+", default=[512], metavar="LEN",
                   help="one length for every prompt, or MIN MAX for uniform lengths")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout", type=int, default=RUN_TIMEOUT_S, help="seconds for one TP size's run")
    p.add_argument("--run", help=argparse.SUPPRESS)       # JSON of one run, in a child process
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.shape, args.num_requests, args.input_len, args.output_len, args.max_model_len = "tiny", 8, [32], 8, 128
    if len(args.input_len) not in (1, 2):
        p.error("--input-len takes one length or MIN MAX")
    args.input_len = [args.input_len[0]] * 2 if len(args.input_len) == 1 else args.input_len
    return args


# --- one run, in its own process ----------------------------------------------------------------------------------
def nvidia_smi(query: str, fields: tuple[str, ...]) -> list[dict]:
    rows = subprocess.run(["nvidia-smi", f"--query-{query}={','.join(fields)}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, [v.strip() for v in row.split(",")])) for row in rows.strip().splitlines()]


def gpu_memory() -> list[dict] | None:
    """Every GPU's name, used and total memory (MiB), as nvidia-smi reports them, and the memory each process holds
    on it (a rank that also holds memory on another rank's GPU shows up here)."""
    if shutil.which("nvidia-smi") is None:
        return None
    gpus = nvidia_smi("gpu", ("index", "uuid", "name", "memory.used", "memory.total", "driver_version"))
    apps = nvidia_smi("compute-apps", ("pid", "gpu_uuid", "used_memory"))
    return [{"index": g["index"], "name": g["name"], "used_mib": g["memory.used"], "total_mib": g["memory.total"],
             "driver": g["driver_version"],
             "processes": {a["pid"]: a["used_memory"] for a in apps if a["gpu_uuid"] == g["uuid"]}} for g in gpus]


def workload(num_requests: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, (num_requests, input_len)).tolist()


def timed_requests(spec: dict, vocab_size: int) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output tokens)] of the benchmark's workload (the same at every TP size)."""
    keys = ("workload", "num_requests", "input_len", "output_len", "seed")
    return make_workload(argparse.Namespace(**{k: spec[k] for k in keys}), vocab_size, spec["max_model_len"])


def throughput_run(spec: dict) -> dict:
    """Build the engine, warm it up, time the workload, read memory while the engine is up, shut it down."""
    from pagedlab import LLM
    started = time.perf_counter()
    llm = LLM(spec["model"], tensor_parallel_size=spec["tp"], dtype=spec["dtype"], device=spec["device"],
              max_model_len=spec["max_model_len"], max_num_seqs=spec["max_num_seqs"], seed=spec["seed"],
              enforce_eager=spec["enforce_eager"], swap_space=0.5, **(
                  {"gpu_memory_utilization": spec["gpu_memory_utilization"]} if spec["device"] == "cuda"
                  else {"cpu_kv_cache_space": 0.1}))
    try:
        return _timed_workload(llm, spec, time.perf_counter() - started)
    finally:
        if spec["tp"] > 1:
            llm.shutdown()


def _timed_workload(llm, spec: dict, startup_s: float) -> dict:
    import torch

    from pagedlab import SamplingParams
    cuda, engine = spec["device"] == "cuda", llm.llm_engine
    vocab = engine.executor.hf_config.vocab_size
    warm_up_pagedlab(llm, vocab)
    work = timed_requests(spec, vocab)
    prompts = [prompt for prompt, _ in work]
    params = [SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True) for _, output_len in work]
    peak_batch, step = 0, engine.step

    def counting_step():
        nonlocal peak_batch
        outputs = step()
        peak_batch = max(peak_batch, engine.last_step.num_running_seqs)
        return outputs
    engine.step = counting_step
    preemptions = engine.totals["preemptions"]
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    budget = engine.kv_budget
    result = {
        "startup_s": round(startup_s, 1), "elapsed_s": round(elapsed, 3),
        "output_tokens_per_s": round(generated / elapsed, 1),
        "total_tokens_per_s": round((generated + sum(map(len, prompts))) / elapsed, 1),
        "requests_per_s": round(len(prompts) / elapsed, 3), "peak_running_seqs": peak_batch,
        "preemptions": engine.totals["preemptions"] - preemptions,
        "kv_cache": {"num_gpu_blocks": budget["num_gpu_blocks"], "block_size": engine.config.cache.block_size,
                     "capacity_tokens": budget["num_gpu_blocks"] * engine.config.cache.block_size,
                     "bytes_per_block_per_rank": budget["bytes_per_block"],
                     "num_gpu_blocks_per_rank": budget.get("num_gpu_blocks_per_rank", [budget["num_gpu_blocks"]])},
        "rank0_budget_gib": {k: round(budget[k] / 2**30, 3) for k in
                             ("total", "weights", "peak_activation", "non_torch", "kv_cache") if k in budget},
        "gpu_memory": gpu_memory(),
        "output_token_ids": [o.outputs[0].token_ids for o in outputs],
    }
    if cuda:
        result["rank0_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


def parity_run(spec: dict) -> list[list[int]]:
    """Greedy tokens of the tiny fp32 model: the same at every TP size if the shards compute the same model."""
    from pagedlab import LLM, SamplingParams
    llm = LLM(spec["parity_model"], tensor_parallel_size=spec["tp"], dtype="float32", device=spec["device"],
              max_model_len=128, max_num_seqs=PARITY_REQUESTS, gpu_memory_utilization=0.1, cpu_kv_cache_space=0.05,
              enforce_eager=spec["enforce_eager"])
    prompts = workload(PARITY_REQUESTS, 20, llm.llm_engine.executor.hf_config.vocab_size, spec["seed"] + 1)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=PARITY_TOKENS, ignore_eos=True), use_tqdm=False)
    finally:
        if spec["tp"] > 1:
            llm.shutdown()
    return [o.outputs[0].token_ids for o in outputs]


def child(spec: dict, result_path: str) -> None:
    import torch
    if spec["device"] == "cpu":
        torch.set_num_threads(1)
    result = {"tp": spec["tp"], "cuda_graphs": not spec["enforce_eager"]}
    try:
        result.update(throughput_run(spec))
    except Exception as exc:  # noqa: BLE001 - a TP size that does not fit is a result
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"TP={spec['tp']} failed: {result['error']}")
    free_memory()       # the engine holds reference cycles: its GPU memory goes before the parity run's engine
    try:
        result["parity_tokens"] = parity_run(spec)
    except Exception as exc:  # noqa: BLE001 - recorded; the report says parity failed
        result["parity_error"] = f"{type(exc).__name__}: {exc}"
        log(f"TP={spec['tp']} parity run failed: {result['parity_error']}")
    if spec["device"] == "cuda":
        result["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        result["cuda"], result["nccl"] = torch.version.cuda, ".".join(map(str, torch.cuda.nccl.version()))
    Path(result_path).write_text(json.dumps(result))


# --- the driver: no CUDA in this process ----------------------------------------------------------------------------
def build_parity_checkpoint(directory: str) -> str:
    """The tiny shape with larger weights (sharper distributions: no near-ties for fp32 rounding to flip)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES["tiny"], initializer_range=0.1, pad_token_id=0))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(directory)
    return directory


def card_budget(args: argparse.Namespace, gpus: list[dict] | None) -> tuple[float, float | None]:
    """(gpu_memory_utilization, GiB of each card it gives): --gpu-memory-utilization as given, else
    --gpu-budget-gib over the first card's total."""
    total_gib = int(gpus[0]["total_mib"]) / 1024 if gpus else None
    if args.gpu_memory_utilization is not None:
        return args.gpu_memory_utilization, total_gib and args.gpu_memory_utilization * total_gib
    if total_gib is None:       # no GPU: the CPU smoke run sizes its cache with cpu_kv_cache_space
        return 0.25, None
    return round(args.gpu_budget_gib / total_gib, 4), args.gpu_budget_gib


def run_child(spec: dict, scratch: str) -> dict:
    """One run in its own session: on a timeout the whole process group goes, the run's TP workers included (one
    stuck in a collective would keep its GPU's memory)."""
    result_path = os.path.join(scratch, f"tp{spec['tp']}.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    run = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--out", scratch, "--run", json.dumps(spec)],
                           start_new_session=True)
    try:
        run.wait(spec["run_timeout"])
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        return {"tp": spec["tp"], "cuda_graphs": not spec["enforce_eager"],
                "error": f"timed out after {spec['run_timeout']} s"}
    if run.returncode or not os.path.exists(result_path):
        return {"tp": spec["tp"], "cuda_graphs": not spec["enforce_eager"],
                "error": f"the run's process exited with code {run.returncode}"}
    return json.loads(Path(result_path).read_text())


def summarize(report: dict) -> str:
    work = report["workload"]
    lengths = ("ShareGPT-like lengths" if work["workload"] == "sharegpt" else
               f"U[{work['input_len'][0]}, {work['input_len'][1]}] in, {work['output_len']} out")
    lines = [f"{report['model']}, {work['num_requests']} requests ({lengths}), "
             f"gpu_memory_utilization {report['gpu_memory_utilization']}"
             + (f" ({report['gpu_budget_gib']:.1f} GiB a card)" if report["gpu_budget_gib"] else "")]
    for run in report["runs"]:
        if "error" in run and "output_tokens_per_s" not in run:
            lines.append(f"  TP={run['tp']}: {run['error']}")
            continue
        memory = ", ".join(f"GPU{g['index']} {int(g['used_mib']) / 1024:.1f} GiB" + (
            f" ({' + '.join(f'{int(m) / 1024:.1f}' for m in g['processes'].values())} GiB by process)"
            if len(g.get("processes", {})) > 1 else "") for g in run["gpu_memory"] or [])
        lines.append(f"  TP={run['tp']}: {run['output_tokens_per_s']:.0f} output tok/s "
                     f"({run['total_tokens_per_s']:.0f} total), KV {run['kv_cache']['capacity_tokens']} tokens, "
                     f"peak batch {run['peak_running_seqs']}, {run['preemptions']} preemptions"
                     + (f"; {memory}" if memory else ""))
    base = report.get("baseline_tp")
    for tp, speedup in report.get("speedup_over_baseline", {}).items():
        agreement = report["agreement_with_baseline"][tp]
        lines.append(f"  TP={tp} / TP={base} output throughput: {speedup:.2f}x; same greedy tokens: first token "
                     f"{agreement['first_token']:.0%} of requests, whole output {agreement['whole_output']:.0%}")
    lines.append(f"  parity (tiny fp32 greedy, equal at every TP size): {report['parity']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run:
        spec = json.loads(args.run)
        child(spec, os.path.join(args.out, f"tp{spec['tp']}.json"))
        return 0
    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.cpu_smoke else "cuda"
    utilization, budget_gib = card_budget(args, gpu_memory())
    scratch = tempfile.mkdtemp(prefix="bench_tp_")
    try:
        model = args.model
        if model is None:
            model = os.path.join(scratch, args.shape)
            log(f"writing a random-weight {args.shape} checkpoint to {model}")
            build_code = ("import torch; from benchmarks.random_checkpoint import write_random_checkpoint; "
                          f"write_random_checkpoint({args.shape!r}, {model!r}, "
                          f"torch.{'float32' if args.cpu_smoke else 'bfloat16'}, {args.seed})")
            subprocess.run([sys.executable, "-c", build_code], check=True, timeout=args.run_timeout,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(
                               filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))})
        parity_model = build_parity_checkpoint(os.path.join(scratch, "parity"))
        spec = dict(model=model, parity_model=parity_model, device=device,
                    dtype="float32" if args.cpu_smoke else "bfloat16", max_model_len=args.max_model_len,
                    max_num_seqs=args.max_num_seqs, gpu_memory_utilization=utilization,
                    enforce_eager=args.enforce_eager, workload=args.workload, num_requests=args.num_requests,
                    input_len=args.input_len, output_len=args.output_len, seed=args.seed,
                    run_timeout=args.run_timeout)
        runs = []
        for tp in map(int, args.tp_sizes.split(",")):
            log(f"TP={tp}")
            runs.append(run_child({**spec, "tp": tp}, scratch))
            if tp > 1 and "output_tokens_per_s" not in runs[-1] and not args.enforce_eager and not args.cpu_smoke:
                log(f"TP={tp} with CUDA graphs failed ({runs[-1]['error']}); again without them")
                runs.append(run_child({**spec, "tp": tp, "enforce_eager": True}, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    by_tp = {run["tp"]: run for run in runs}
    tokens = [run.get("parity_tokens") for run in by_tp.values()]
    report = {
        "command": shlex.join([sys.executable] + sys.argv), "model": args.model or f"random {args.shape}",
        "device": device, "gpus": gpu_memory(), "versions": versions(),
        "gpu_memory_utilization": utilization, "gpu_budget_gib": budget_gib,
        "workload": {k: getattr(args, k) for k in ("workload", "num_requests", "input_len", "output_len",
                                                   "max_model_len")},
        "runs": [{k: v for k, v in run.items() if k not in ("parity_tokens", "output_token_ids")} for run in runs],
        "parity": "failed to run" if None in tokens else "equal" if all(t == tokens[0] for t in tokens) else
                  "DIFFERENT",
    }
    ran = sorted(tp for tp, run in by_tp.items() if "output_tokens_per_s" in run)
    if len(ran) > 1:
        base = by_tp[ran[0]]
        report["baseline_tp"] = ran[0]
        report["speedup_over_baseline"], report["agreement_with_baseline"] = {}, {}
        for tp in ran[1:]:
            report["speedup_over_baseline"][tp] = round(by_tp[tp]["output_tokens_per_s"]
                                                        / base["output_tokens_per_s"], 2)
            # bf16 sums in another order: a near-tie may flip a token, and a sequence differs from there on
            pairs = list(zip(base["output_token_ids"], by_tp[tp]["output_token_ids"]))
            report["agreement_with_baseline"][tp] = {
                "first_token": sum(a[0] == b[0] for a, b in pairs) / len(pairs),
                "whole_output": sum(a == b for a, b in pairs) / len(pairs)}
    Path(args.out, "tp.json").write_text(json.dumps(report, indent=2))
    print(summarize(report))
    wanted = [int(tp) for tp in args.tp_sizes.split(",") if int(tp) > 1]
    return 0 if report["parity"] == "equal" and all(tp in ran for tp in wanted) else 1


if __name__ == "__main__":
    sys.exit(main())
