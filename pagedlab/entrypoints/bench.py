"""`pagedlab bench`: offline throughput of pagedlab against Hugging Face transformers, in one process.

One random-weight model (a real model's shape, built with transformers' `from_config` and saved, so every system
runs the very same weights) and one workload (default: 256 requests, prompts of 64-512 random tokens, 128 output
tokens each, EOS ignored) go through:
  pagedlab                     `LLM(dir).generate(...)`: paged KV cache, continuous batching, CUDA graphs
  transformers_generate        `model.generate` in static batches, left-padded; the best of a batch-size sweep
  transformers_generate_batch  `model.generate_batch`: transformers' own continuous batching (timed after its warm-up)
and are held to a roofline bound measured on the same GPU in the same run: prefill FLOPs at the bf16 matmul rate,
plus, per decode step, the weights and every running sequence's KV read once at the copy bandwidth. pagedlab's
latency (TTFT, inter-token) is measured at a fixed Poisson request rate, and one decode step is broken down into
host and device time. Writes `throughput_<shape>.json` and `.png` to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

from pagedlab.sim.profiler import versions

SYSTEMS = ("pagedlab", "hf-generate", "hf-generate-batch")
SYSTEM_KEYS = {"pagedlab": "pagedlab", "hf-generate": "transformers_generate",
               "hf-generate-batch": "transformers_generate_batch"}

_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
# transformers LlamaConfig kwargs of each shape ("tiny": a smoke test that runs on a CPU)
SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=128000, eos_token_id=128001),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                       rope_parameters=dict(rope_type="default", rope_theta=500000.0), tie_word_embeddings=False,
                       rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    # 131 GiB of bf16: no single card holds it (tensor_parallel_size 4 or 8); written by benchmarks/random_checkpoint.py
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                        rope_parameters=dict(rope_type="default", rope_theta=500000.0), tie_word_embeddings=False,
                        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0), tie_word_embeddings=False,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
}
DEFAULT_RATES = {"llama-3.2-1b": 64.0, "llama-3-8b": 16.0, "tiny": 32.0}   # requests/s for the latency run
PAD_ID = 0
TARGETS = {"llama-3.2-1b": 10.0, "llama-3-8b": 5.0}     # pagedlab / transformers, both baselines
ROOFLINE_TARGET = 2.2                                   # pagedlab's time within this factor of the bound


# --- command line ------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--model", default=None, help="an existing HF checkpoint directory instead of random weights")
    p.add_argument("--workload", default="random", choices=["random", "sharegpt"],
                   help="random: prompts U[--input-len], --output-len each; sharegpt: data/traces lengths")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--hf-batch-sizes", default="32,64,128,256",
                   help="static batch sizes tried for transformers generate (the first batch of each is timed, "
                        "then the whole workload runs at the fastest)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--request-rate", type=float, default=None,
                   help="requests/s of the Poisson latency run (default: per shape, "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RATES.items()) + ")")
    p.add_argument("--latency-requests", type=int, default=128, help="requests in the latency run (0: skip it)")
    p.add_argument("--no-profile", action="store_true", help="skip the decode-step breakdown")
    p.add_argument("--ab-unfused", action="store_true",
                   help="after everything else, rerun pagedlab's throughput with the fused element-wise kernels off "
                        "(decode graphs recaptured): what pagedlab/layers/fused_ops.py is worth")
    p.add_argument("--check", action="store_true",
                   help="first check the GPU path: greedy tokens and logits against transformers (fp32, bf16), "
                        "CUDA graphs against eager")
    p.add_argument("--check-only", action="store_true", help="only the checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench", help="directory for the JSON and the PNG")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="offline throughput vs transformers, roofline and latency on one GPU")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None, prog: str = "bench_throughput.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


# --- helpers -----------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _torch():
    import torch
    return torch


def sync(device) -> None:
    torch = _torch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    torch = _torch()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def percentiles(values: list[float]) -> dict:
    import numpy as np
    if not values:
        return {}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "count": int(a.size)}


def gib(b) -> float | None:
    return None if b is None else round(b / 2**30, 3)


# --- workload ----------------------------------------------------------------------------------------------------
def make_workload(args, vocab_size: int, max_model_len: int) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output tokens)]: random token ids, lengths as the workload says."""
    import numpy as np
    rng = np.random.default_rng(args.seed)
    if args.workload == "random":
        lo, hi = args.input_len
        lens = [(int(n), args.output_len) for n in rng.integers(lo, hi + 1, args.num_requests)]
    else:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "data", "traces", "sharegpt.jsonl")
        with open(path) as f:
            rows = [json.loads(line) for line in f][:args.num_requests]
        lens = [(r["prompt_len"], r["output_len"]) for r in rows]
    work = []
    for prompt_len, output_len in lens:
        prompt_len = max(1, min(prompt_len, max_model_len - output_len))
        work.append((rng.integers(3, vocab_size, prompt_len).tolist(), output_len))
    return work


def workload_stats(work) -> dict:
    prompts = [len(p) for p, _ in work]
    outputs = [o for _, o in work]
    return {"num_requests": len(work), "prompt_tokens": sum(prompts), "output_tokens": sum(outputs),
            "prompt_len_min": min(prompts), "prompt_len_mean": sum(prompts) / len(prompts),
            "prompt_len_max": max(prompts), "output_len_min": min(outputs),
            "output_len_mean": sum(outputs) / len(outputs), "output_len_max": max(outputs)}


# --- model -------------------------------------------------------------------------------------------------------
def build_random_checkpoint(shape: str, directory: str, dtype, device, seed: int):
    """A random-weight Llama of `shape`, built on `device` in `dtype` and saved to `directory`; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    spec = SHAPES[shape]
    config = LlamaConfig(**spec, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to(device).eval().requires_grad_(False)
    model.generation_config = GenerationConfig(bos_token_id=spec["bos_token_id"], eos_token_id=spec["eos_token_id"],
                                               pad_token_id=PAD_ID)
    model.save_pretrained(directory)
    return model


def load_hf(directory: str, dtype, device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval().requires_grad_(False)


def model_dims(hf_config) -> dict:
    """Parameter counts and per-token KV bytes of a Llama-like config (what the roofline needs)."""
    h, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    hq, hkv = hf_config.num_attention_heads, hf_config.num_key_value_heads
    d = getattr(hf_config, "head_dim", None) or h // hq
    inter, vocab = hf_config.intermediate_size, hf_config.vocab_size
    per_layer = h * (hq * d + 2 * hkv * d) + hq * d * h + 3 * h * inter
    return {"layers": layers, "hidden": h, "num_heads": hq, "num_kv_heads": hkv, "head_dim": d,
            "intermediate": inter, "vocab": vocab, "layer_params": per_layer * layers, "lm_head_params": vocab * h,
            "embedding_params": vocab * h, "tied": bool(getattr(hf_config, "tie_word_embeddings", False))}


# --- ceilings and roofline ---------------------------------------------------------------------------------------
def measure_ceilings(device) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, measured here and now."""
    import torch
    if device.type != "cuda":
        return {"copy_bytes_per_s": 3.0e12, "matmul_flops_per_s": 790e12, "measured": False,
                "note": "no GPU: the H100 figures of the anchors, for the smoke test only"}
    from triton.testing import do_bench

    n = 1 << 30     # 1 GiB of bf16, twice
    src = torch.randn(n // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    del a, b
    free_memory()
    return {"copy_bytes_per_s": 2 * n / (copy_ms * 1e-3), "matmul_flops_per_s": 2 * 8192 ** 3 / (mm_ms * 1e-3),
            "copy_ms_2GiB": copy_ms, "matmul_ms_8192": mm_ms, "measured": True}


def roofline(work, dims: dict, ceilings: dict, max_num_seqs: int, dtype_bytes: int = 2) -> dict:
    """Lower bound on the workload's time: prefill FLOPs at the matmul rate, then decode steps that each read the
    weights once and every running sequence's KV once at the copy bandwidth (or their FLOPs, if more), with at most
    max_num_seqs sequences decoding at a time in arrival order; each request's first token comes from its prefill."""
    bw, rate = ceilings["copy_bytes_per_s"], ceilings["matmul_flops_per_s"]
    layers, hq, d = dims["layers"], dims["num_heads"], dims["head_dim"]
    kv_per_token = 2 * layers * dims["num_kv_heads"] * d * dtype_bytes
    linear = dims["layer_params"]
    prefill_flops = 0.0
    for prompt, _ in work:
        n = len(prompt)
        prefill_flops += 2 * linear * n + 4 * layers * hq * d * n * (n + 1) / 2 + 2 * dims["lm_head_params"]
    prefill_s = prefill_flops / rate
    weight_bytes = (linear + dims["lm_head_params"]) * dtype_bytes
    # decode: (context, tokens left) of each running sequence
    pending = [(len(p) + 1, o - 1) for p, o in work]
    running, decode_s, steps, bytes_total = [], 0.0, 0, 0.0
    pending.reverse()
    while pending or running:
        while pending and len(running) < max_num_seqs:
            ctx, left = pending.pop()
            if left > 0:
                running.append([ctx, left])
        if not running:
            continue
        kv_bytes = sum(ctx for ctx, _ in running) * kv_per_token
        flops = len(running) * 2 * (linear + dims["lm_head_params"]) + sum(
            4 * layers * hq * d * ctx for ctx, _ in running)
        step_bytes = weight_bytes + kv_bytes
        decode_s += max(step_bytes / bw, flops / rate)
        bytes_total += step_bytes
        steps += 1
        for r in running:
            r[0] += 1
            r[1] -= 1
        running = [r for r in running if r[1] > 0]
    total = prefill_s + decode_s
    out_tokens = sum(o for _, o in work)
    return {"prefill_flops": prefill_flops, "prefill_s": prefill_s, "decode_steps": steps, "decode_s": decode_s,
            "decode_bytes": bytes_total, "weight_bytes_per_step": weight_bytes, "kv_bytes_per_token": kv_per_token,
            "bound_s": total, "output_tokens_per_s": out_tokens / total}


# --- pagedlab ----------------------------------------------------------------------------------------------------
def engine_kwargs(args, device) -> dict:
    kw = dict(dtype=args.dtype, device=str(device), block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=args.enforce_eager, seed=args.seed)
    if device.type == "cuda":
        kw.update(gpu_memory_utilization=args.gpu_memory_utilization, swap_space=0.5)
    else:
        kw.update(cpu_kv_cache_space=1.0, swap_space=0.1)
    return kw


def warm_up_pagedlab(llm, vocab: int) -> None:
    """Compile every kernel variant the run can meet (prefill tiles depend on the longest new-token run) and
    touch the decode graphs, so that no Triton compilation lands inside a timed run."""
    from pagedlab import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for n in (2, 5, 9, 40, 300):
        llm.generate([{"prompt_token_ids": [(7 * i + n) % (vocab - 3) + 3 for i in range(n)]}], params,
                     use_tqdm=False)
    llm.generate([{"prompt_token_ids": [5 + i % 50 for i in range(20 + k)]} for k in range(24)], params,
                 use_tqdm=False)


def run_pagedlab(model_dir, work, args, device, dims) -> tuple[dict, object]:
    import torch
    from pagedlab import LLM, SamplingParams

    t_load = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    llm = LLM(model_dir, **engine_kwargs(args, device))
    engine = llm.llm_engine
    warm_up_pagedlab(llm, dims["vocab"])
    startup_s = time.perf_counter() - t_load

    # KV utilization, sampled every 8 steps (a cheap pass over the block tables)
    samples = []
    original_update = engine.scheduler.update

    def update(out, results):
        finished = original_update(out, results)
        if out.step % 8 == 0:
            u = engine.kv.usage()
            samples.append((u.utilization, u.usage, u.tokens))
        return finished

    engine.scheduler.update = update
    # every step's wall time and shape: a one-time cost inside the run (a kernel compiling) shows up here
    steps_log = []
    original_step = engine.step

    def step():
        t = time.perf_counter()
        outputs = original_step()
        s = engine.last_step
        steps_log.append((time.perf_counter() - t, s.num_batched_tokens, s.num_prefill_tokens))
        return outputs

    engine.step = step
    shared = len({o for _, o in work}) == 1
    params = SamplingParams(temperature=0, max_tokens=work[0][1], ignore_eos=True) if shared else \
        [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    prompts = [{"prompt_token_ids": p} for p, _ in work]
    steps0 = engine.scheduler.step_id
    preempt0 = engine.scheduler.num_preemptions
    sync(device)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    elapsed = time.perf_counter() - t0
    engine.scheduler.update = original_update
    del engine.step
    decode_steps = [d for d, _, prefill in steps_log if prefill == 0]
    prefill_steps = [d for d, _, prefill in steps_log if prefill]
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    errors = [o.error for o in outputs if o.error]
    report = engine.kv_budget
    result = {
        "wall_s": elapsed, "generated_tokens": generated, "expected_tokens": sum(o for _, o in work),
        "errors": errors[:3], "num_errors": len(errors), "steps": engine.scheduler.step_id - steps0,
        "preemptions": engine.scheduler.num_preemptions - preempt0, "startup_s": startup_s,
        "kv_cache_gib": gib(report.get("kv_cache")), "kv_blocks": report.get("num_gpu_blocks"),
        "kv_tokens_capacity": report.get("num_gpu_blocks", 0) * args.block_size,
        "kv_utilization_mean": sum(s[0] for s in samples) / len(samples) if samples else None,
        "kv_usage_peak": max((s[1] for s in samples), default=None),
        "kv_tokens_peak": max((s[2] for s in samples), default=None),
        "cuda_graph_batch_sizes": list(engine.executor.graph_batch_sizes),
        "step_time_s": {"decode_steps": len(decode_steps), "decode_total": sum(decode_steps),
                        "decode_median_ms": 1e3 * sorted(decode_steps)[len(decode_steps) // 2] if decode_steps else None,
                        "prefill_steps": len(prefill_steps), "prefill_total": sum(prefill_steps),
                        "slowest": [{"ms": round(1e3 * d, 2), "tokens": n, "prefill_tokens": p}
                                    for d, n, p in sorted(steps_log, reverse=True)[:6]]},
        "config": {k: v for k, v in engine_kwargs(args, device).items()},
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
        result["peak_gpu_reserved_gib"] = gib(torch.cuda.max_memory_reserved(device))
    return result, llm


def profile_decode(llm, work, device) -> dict:
    """Where a step's time goes: host time per phase over a run of the workload (perf_counter around the
    scheduler, input building, the forward launch, the sampler -- which waits for the GPU -- and the update), and
    the device time of the largest decode graph and of the logits + argmax, timed alone with CUDA events."""
    import torch
    from pagedlab import SamplingParams

    engine = llm.llm_engine
    runner, sched = engine.executor, engine.scheduler
    phases: dict[str, list[float]] = {k: [] for k in ("schedule", "prepare", "forward_launch", "sample_and_wait",
                                                      "update", "step")}
    current: dict[str, float] = {}
    originals = {}

    def wrap(obj, name, key):
        fn = getattr(obj, name)
        originals[(obj, name)] = fn

        def timed(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            current[key] = current.get(key, 0.0) + time.perf_counter() - t
            return r
        setattr(obj, name, timed)

    wrap(sched, "schedule", "schedule")
    wrap(sched, "update", "update")
    wrap(runner.input_batch, "update", "prepare")
    wrap(runner, "prepare", "prepare")
    wrap(runner, "upload", "prepare")
    wrap(runner, "forward", "forward_launch")
    wrap(runner, "sample", "sample_and_wait")
    engine.report_unfinished = False
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    for (p, _), sp in zip(work, params):
        engine.add_request({"prompt_token_ids": p}, sp)
    decode_records, mixed_records = [], []
    sync(device)
    while engine.has_unfinished_requests():
        current.clear()
        t = time.perf_counter()
        engine.step()
        current["step"] = time.perf_counter() - t
        stats = engine.last_step
        rec = dict(current, batch=stats.num_batched_tokens)
        (decode_records if stats.num_prefill_tokens == 0 else mixed_records).append(rec)
    for (obj, name), fn in originals.items():
        delattr(obj, name) if name in vars(obj) else setattr(obj, name, fn)

    def summary(records):
        if not records:
            return {}
        out = {k: 1e3 * sum(r.get(k, 0.0) for r in records) / len(records) for k in phases}
        out["host_other"] = out["step"] - sum(out[k] for k in phases if k != "step")
        out["steps"] = len(records)
        out["mean_batch"] = sum(r["batch"] for r in records) / len(records)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}

    result = {"unit": "ms per step", "decode_steps": summary(decode_records),
              "steps_with_prefill": summary(mixed_records)}
    if device.type == "cuda" and runner.graphs:
        batch = runner.graph_batch_sizes[-1]
        graph = runner.graphs[batch]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            graph.replay()
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        result["graph_replay_ms"] = {"batch": batch, "ms": start.elapsed_time(end) / 20,
                                     "note": "context as left in the graph buffers by the last decode step"}
        hidden = runner.graph_output[:batch]
        start.record()
        for _ in range(20):
            runner.model.compute_logits(hidden).argmax(dim=-1)
        end.record()
        torch.cuda.synchronize()
        result["logits_argmax_ms"] = start.elapsed_time(end) / 20
    return result


def run_unfused(llm, work, device) -> dict:
    """The same throughput run with pagedlab.layers.fused_ops off: torch element-wise layers, graphs recaptured."""
    from pagedlab import SamplingParams
    from pagedlab.layers import fused_ops

    runner = llm.llm_engine.executor
    fused_ops.ENABLED = False
    try:
        if runner.graphs:
            runner.graphs.clear()
            runner.graph_output = None
            free_memory()
            runner._capture_decode_graphs()
        warm_up_pagedlab(llm, runner.hf_config.vocab_size)
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
        sync(device)
        t0 = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p, _ in work], params, use_tqdm=False)
        sync(device)
        elapsed = time.perf_counter() - t0
    finally:
        fused_ops.ENABLED = True
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"wall_s": elapsed, "generated_tokens": generated, "output_tokens_per_s": generated / elapsed}


def run_latency(llm, work, rate: float, num: int, seed: int) -> dict:
    """Poisson arrivals at `rate` req/s, added as the wall clock passes; the engine steps whenever it has work."""
    import numpy as np
    from pagedlab import SamplingParams

    engine = llm.llm_engine
    engine.report_unfinished = False
    rng = np.random.default_rng(seed + 1)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num)).tolist()
    reqs = []
    clock = engine.clock
    start = clock()
    i = 0
    while i < num or engine.has_unfinished_requests():
        now = clock()
        while i < num and start + arrivals[i] <= now:
            prompt, out_len = work[i % len(work)]
            reqs.append(engine.add_request({"prompt_token_ids": prompt},
                                           SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True),
                                           arrival_time=start + arrivals[i]))
            i += 1
        if engine.has_unfinished_requests():
            engine.step()
        elif i < num:
            time.sleep(max(0.0, start + arrivals[i] - clock()))
    end = clock()
    ttft = [r.first_token_time - r.arrival_time for r in reqs if r.first_token_time is not None]
    itl = [b - a for r in reqs for a, b in zip(r.token_times, r.token_times[1:])]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in reqs if len(r.token_times) > 1]
    e2e = [r.finished_time - r.arrival_time for r in reqs if r.finished_time is not None]
    out_tokens = sum(len(s.output_token_ids) for r in reqs for s in r.seqs)
    return {"request_rate": rate, "num_requests": num, "duration_s": end - start,
            "output_tokens_per_s": out_tokens / (end - start), "ttft_s": percentiles(ttft),
            "inter_token_latency_s": percentiles(itl), "tpot_s": percentiles(tpot), "e2e_latency_s": percentiles(e2e)}


# --- transformers ------------------------------------------------------------------------------------------------
def hf_static_batch(model, batch, device) -> tuple[float, int, int, int]:
    """One left-padded static batch through generate; (seconds, useful output tokens, real KV tokens, KV slots)."""
    import torch
    prompts = [p for p, _ in batch]
    new = max(o for _, o in batch)
    width = max(map(len, prompts))
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=PAD_ID)
    sync(device)
    seconds = time.perf_counter() - t
    produced = out.shape[1] - width
    useful = sum(min(o, produced) for _, o in batch)
    real = sum(len(p) + min(o, produced) for p, o in batch)
    return seconds, useful, real, len(batch) * (width + produced)


def run_hf_generate(model, work, batch_sizes: list[int], device) -> dict:
    import torch
    hf_static_batch(model, [(work[0][0][:16], 4), (work[1][0][:8], 4)], device)     # warm-up
    probes = {}
    best = None
    for b in batch_sizes:
        if b > len(work) and probes:
            continue
        batch = work[:b]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds, useful, real, slots = hf_static_batch(model, batch, device)
        except torch.cuda.OutOfMemoryError as exc:
            probes[b] = {"error": f"OOM: {str(exc)[:200]}"}
            free_memory()
            continue
        probe = {"requests": len(batch), "wall_s": seconds, "output_tokens_per_s": useful / seconds,
                 "kv_utilization": real / slots}
        if device.type == "cuda":
            probe["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
        probes[b] = probe
        log(f"  generate batch {b}: {probe['output_tokens_per_s']:.0f} output tok/s (first batch)")
        if best is None or probe["output_tokens_per_s"] > probes[best]["output_tokens_per_s"]:
            best = b
    if best is None:
        return {"error": "every batch size failed", "probes": probes}
    # the whole workload at the best batch size (its first batch is the probe, already timed)
    first = probes[best]
    total_s, useful_total = first["wall_s"], first["output_tokens_per_s"] * first["wall_s"]
    utilizations = [first["kv_utilization"]]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for start in range(best, len(work), best):
        seconds, useful, real, slots = hf_static_batch(model, work[start:start + best], device)
        total_s += seconds
        useful_total += useful
        utilizations.append(real / slots)
    result = {"best_batch_size": best, "wall_s": total_s, "generated_tokens": int(round(useful_total)),
              "batches": len(utilizations), "kv_utilization_mean": sum(utilizations) / len(utilizations),
              "probes": {str(k): v for k, v in probes.items()}}
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = max(first.get("peak_gpu_memory_gib") or 0,
                                            gib(torch.cuda.max_memory_allocated(device)) or 0)
    return result


def run_hf_generate_batch(model, work, device) -> dict:
    """transformers' continuous batching. Its warm-up (CUDA graph capture) happens inside generate_batch before
    the requests are added; the timed part starts at that point (found by wrapping the manager's add_request)."""
    import torch
    from transformers import GenerationConfig

    marks: dict[str, float] = {}
    patched = []
    try:
        from transformers.generation.continuous_batching import ContinuousBatchingManager as manager_cls
    except ImportError:
        manager_cls = None
    if manager_cls is not None:
        for name in ("add_request", "add_requests"):
            fn = getattr(manager_cls, name, None)
            if fn is None:
                continue

            def marked(self, *a, _fn=fn, **k):
                marks.setdefault("start", time.perf_counter())
                return _fn(self, *a, **k)
            setattr(manager_cls, name, marked)
            patched.append((name, fn))
    outputs = set(o for _, o in work)
    config = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    inputs = [p for p, _ in work]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        sync(device)
        t0 = time.perf_counter()
        results = model.generate_batch(inputs, generation_config=config, progress_bar=False)
        sync(device)
        t1 = time.perf_counter()
    finally:
        for name, fn in patched:
            setattr(manager_cls, name, fn)
    gen = [len(r.generated_tokens) for r in results.values()]
    start = marks.get("start", t0)
    useful = sum(min(g, o) for g, (_, o) in zip(gen, work)) if len(outputs) > 1 else sum(gen)
    result = {"wall_s": t1 - start, "wall_with_warmup_s": t1 - t0, "warmup_s": start - t0,
              "generated_tokens": useful, "results": len(results), "timed_from": "first add_request" if marks else
              "call start (add_request not found: includes warm-up)",
              "generated_len_min": min(gen, default=0), "generated_len_max": max(gen, default=0)}
    if len(outputs) > 1:
        result["note"] = ("generate_batch takes one max_new_tokens: every request generated the longest output; "
                          "only each request's own output length counts")
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
        result["peak_gpu_reserved_gib"] = gib(torch.cuda.max_memory_reserved(device))
    return result


# --- checks of the GPU path --------------------------------------------------------------------------------------
def run_checks(device, seed: int = 0) -> dict:
    """A small random Llama on `device`: pagedlab greedy tokens vs transformers (fp32), logits vs a teacher-forced
    transformers fp32 reference (fp32 and bf16; transformers' own bf16 error is the yardstick), and CUDA graphs vs
    enforce_eager (identical greedy tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from pagedlab import LLM, SamplingParams

    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    directory = tempfile.mkdtemp(prefix="pagedlab-check-")
    hf.save_pretrained(directory)
    hf = hf.to(device)
    hf.generation_config.eos_token_id = None     # pagedlab ignores EOS here; transformers must not stop or mask it
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 7, 15, 16, 17, 31, 64, 100, 200, 333, 500]
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]
    new_tokens = [8 + 4 * i for i in range(len(prompts))]   # the batch shrinks through the graph buckets

    with torch.no_grad():
        hf_tokens = []
        for p, k in zip(prompts, new_tokens):
            ids = torch.tensor([p], device=device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, do_sample=False)
            hf_tokens.append(out[0, len(p):].tolist())

    def reference_logits(model, p, toks):
        with torch.no_grad():
            ids = torch.tensor([p + toks[:-1]], device=device)
            return model(ids).logits[0, len(p) - 1:].float()

    def pagedlab_run(dtype: str, eager: bool):
        llm = LLM(directory, dtype=dtype, device=str(device), max_model_len=1024, max_num_seqs=16,
                  num_gpu_blocks_override=1024, enforce_eager=eager, swap_space=0.05)
        runner = llm.llm_engine.executor
        logits: dict[int, list] = {}
        sample = runner.sample

        def recording(batch_logits, out, grammar=None):
            if batch_logits is not None:
                sampling = [seq_id for seq_id, k in zip(out.seq_ids, out.num_samples) if k]
                for seq_id, row_logits in zip(sampling, batch_logits):
                    logits.setdefault(seq_id, []).append(row_logits.float().cpu())
            return sample(batch_logits, out, grammar)
        runner.sample = recording
        params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in new_tokens]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outs]
        per_prompt = [torch.stack(v) for _, v in sorted(logits.items())]     # seq ids follow the prompt order
        graphs = list(runner.graph_batch_sizes)
        del llm, runner
        free_memory()
        return tokens, per_prompt, graphs

    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    result = {"device": str(device)}
    runs = {}
    for dtype in ("float32", "bfloat16"):
        for eager in (False, True):
            runs[(dtype, eager)] = pagedlab_run(dtype, eager)
    hf_bf16 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    for dtype in ("float32", "bfloat16"):
        tokens, logits, graphs = runs[(dtype, False)]
        eager_tokens, eager_logits, _ = runs[(dtype, True)]
        ref = [reference_logits(hf, p, t) for p, t in zip(prompts, tokens)]
        errs = [rel_err(a.to(r.device), r) for a, r in zip(logits, ref)]
        entry = {"graph_batch_sizes": graphs,
                 "greedy_equal_to_transformers": sum(a == b for a, b in zip(tokens, hf_tokens)),
                 "sequences": len(prompts),
                 "max_logits_rel_err_vs_transformers_fp32": max(errs),
                 "graphs_vs_eager_equal_tokens": sum(a == b for a, b in zip(tokens, eager_tokens))}
        # Logits are compared up to each sequence's first differing token (after it the contexts differ); a flip
        # is described by the gap between the two tokens in the reference and in eager mode at that position.
        diffs, flips = [], []
        for i, (a, b) in enumerate(zip(tokens, eager_tokens)):
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a) - 1)
            diffs.append(float((logits[i][:j + 1] - eager_logits[i][:j + 1]).abs().max()))
            if a != b:
                flips.append({"prompt": i, "position": j, "graphs": a[j], "eager": b[j],
                              "reference_logit_gap": float(abs(ref[i][j][a[j]] - ref[i][j][b[j]])),
                              "eager_logit_gap": float(abs(eager_logits[i][j][a[j]] - eager_logits[i][j][b[j]]))})
        entry["graphs_vs_eager_max_abs_logit_diff"] = max(diffs)
        entry["graphs_vs_eager_flips"] = flips
        first_diff = []
        for i, (a, b) in enumerate(zip(tokens, hf_tokens)):
            if a != b:
                j = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
                row = ref[i][j]
                first_diff.append({"prompt": i, "position": j, "pagedlab": a[j], "transformers": b[j],
                                   "reference_logit_gap": float(row.max() - row[a[j]])})
        entry["mismatches"] = first_diff
        if dtype == "bfloat16":
            hf_errs = [rel_err(reference_logits(hf_bf16, p, t), r) for p, t, r in zip(prompts, tokens, ref)]
            entry["transformers_bf16_rel_err_vs_fp32"] = max(hf_errs)
            entry["ok"] = max(errs) <= max(2 * max(hf_errs), 1e-2)
        else:
            # fp32 on both sides (the kernels' dots too): only summation orders differ, so greedy may flip only
            # where the reference's top two are ~tied
            entry["ok"] = max(errs) < 2e-3 and all(d["reference_logit_gap"] < 1e-2 for d in first_diff)
        entry["ok_graphs_vs_eager"] = entry["graphs_vs_eager_equal_tokens"] == len(prompts)
        result[dtype] = entry
        log(f"check {dtype}: {json.dumps(entry)}")
    del hf, hf_bf16
    shutil.rmtree(directory, ignore_errors=True)
    free_memory()
    result["ok"] = all(result[d]["ok"] for d in ("float32", "bfloat16")) and result["float32"]["ok_graphs_vs_eager"]
    return result


# --- report ------------------------------------------------------------------------------------------------------
def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values, colors = [], [], []
    labels = {"pagedlab": "pagedlab", "transformers_generate": "transformers\ngenerate",
              "transformers_generate_batch": "transformers\ngenerate_batch"}
    for key, label in labels.items():
        s = report["systems"].get(key, {})
        if s.get("output_tokens_per_s"):
            extra = f"\n(batch {s['best_batch_size']})" if key == "transformers_generate" else ""
            names.append(label + extra)
            values.append(s["output_tokens_per_s"])
            colors.append("#1f77b4" if key == "pagedlab" else "#999999")
    bound = report.get("roofline", {}).get("output_tokens_per_s")
    if bound:
        names.append("roofline\nbound")
        values.append(bound)
        colors.append("#2ca02c")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    bars = ax.bar(names, values, color=colors)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
    if bound:
        ax.axhline(bound / ROOFLINE_TARGET, color="#2ca02c", ls="--", lw=1,
                   label=f"roofline bound / {ROOFLINE_TARGET} (the target)")
        ax.legend(loc="upper center", fontsize=8, frameon=False)
    w = report["workload"]
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{report['shape']} (random weights, {report['dtype']}) on {report['gpu']}\n"
                 f"{w['num_requests']} requests, prompts {w['prompt_len_min']}-{w['prompt_len_max']}, "
                 f"{w['output_len_mean']:.0f} output tokens on average", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(report: dict) -> str:
    lines = [f"{'system':30s} {'out tok/s':>10s} {'total tok/s':>12s} {'wall s':>8s} {'peak GiB':>9s} "
             f"{'KV util':>8s} {'pagedlab x':>10s}"]
    for key, s in report["systems"].items():
        if "output_tokens_per_s" not in s:
            lines.append(f"{key:30s} error: {s.get('error', '?')}")
            continue
        util = s.get("kv_utilization_mean")
        ratio = report["ratios"].get(f"pagedlab_over_{key}")
        lines.append(f"{key:30s} {s['output_tokens_per_s']:10,.0f} {s['total_tokens_per_s']:12,.0f} "
                     f"{s['wall_s']:8.2f} {s.get('peak_gpu_memory_gib') or 0:9.2f} "
                     f"{'' if util is None else f'{util:.1%}':>8s} {'' if ratio is None else f'{ratio:.2f}':>10s}")
    r = report.get("roofline")
    if r:
        lines.append(f"{'roofline bound':30s} {r['output_tokens_per_s']:10,.0f} {'':12s} {r['bound_s']:8.2f}"
                     f"   (prefill {r['prefill_s']:.3f} s + {r['decode_steps']} decode steps {r['decode_s']:.3f} s)")
    for k, v in report.get("targets", {}).items():
        lines.append(f"target {k}: {v}")
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------------------------
def finalize(report: dict) -> None:
    """Rates, pagedlab's ratios to the others and to the roofline bound, and the targets, from what has run."""
    stats = report.get("workload")
    bound = report.get("roofline")
    if not stats or not bound:
        return
    for s in report["systems"].values():
        if s.get("wall_s") and s.get("generated_tokens"):
            s["output_tokens_per_s"] = s["generated_tokens"] / s["wall_s"]
            s["total_tokens_per_s"] = (s["generated_tokens"] + stats["prompt_tokens"]) / s["wall_s"]
    ours = report["systems"].get("pagedlab", {})
    if not ours.get("output_tokens_per_s"):
        return
    ours["fraction_of_roofline"] = bound["bound_s"] / ours["wall_s"]
    report["ratios"]["pagedlab_time_over_roofline_bound"] = ours["wall_s"] / bound["bound_s"]
    for key, s in report["systems"].items():
        if key != "pagedlab" and s.get("output_tokens_per_s"):
            report["ratios"][f"pagedlab_over_{key}"] = ours["output_tokens_per_s"] / s["output_tokens_per_s"]
    goal = TARGETS.get(report["shape"])
    if goal:
        for key in ("transformers_generate", "transformers_generate_batch"):
            r = report["ratios"].get(f"pagedlab_over_{key}")
            if r is not None:
                report["targets"][f">= {goal:g}x {key}"] = f"{r:.2f}x: {'met' if r >= goal else 'NOT met'}"
    over = report["ratios"]["pagedlab_time_over_roofline_bound"]
    report["targets"][f"within {ROOFLINE_TARGET}x of the roofline bound"] = \
        f"{over:.2f}x: {'met' if over <= ROOFLINE_TARGET else 'NOT met'}"


def run(args) -> int:
    import torch

    from pagedlab.models.loader import resolve_device

    device = resolve_device(args.device)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown system(s) {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    os.makedirs(args.out, exist_ok=True)
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16",
                            "float": "float32"}.get(args.dtype, args.dtype))
    shape = "custom" if args.model else args.shape
    command = "pagedlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if os.path.basename(sys.argv[0]) in ("pagedlab", "__main__.py", "cli.py") else \
        "python " + " ".join(shlex.quote(a) for a in sys.argv)
    report = {"command": command, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              **versions(), "shape": shape, "dtype": str(dtype).replace("torch.", ""), "seed": args.seed,
              "fused_ops": os.environ.get("PAGEDLAB_FUSED_OPS", "1") != "0",
              "systems": {}, "ratios": {}, "targets": {}}
    json_path = os.path.join(args.out, f"throughput_{shape}.json")

    def save():
        finalize(report)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2, default=str)

    def attempt(name: str, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one system failing must not lose the others
            import traceback
            traceback.print_exc()
            return {"error": f"{type(exc).__name__}: {exc}"}

    if args.check or args.check_only:
        log("checks of the GPU path")
        report["checks"] = attempt("checks", lambda: run_checks(device, args.seed))
        report["checks"].setdefault("ok", False)
        save()
        if args.check_only:
            print(json.dumps(report["checks"], indent=1, default=str))
            return 0 if report["checks"].get("ok") else 1

    log(f"ceilings on {report['gpu']}")
    report["ceilings"] = measure_ceilings(device)
    log(f"  copy {report['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"matmul {report['ceilings']['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")

    tmp_root = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 40 * 2**30 else None
    model_dir = args.model or tempfile.mkdtemp(prefix="pagedlab-bench-", dir=tmp_root)
    hf_model = None
    try:
        t = time.perf_counter()
        if args.model:
            from pagedlab.models.loader import load_hf_config
            hf_config = load_hf_config(args.model)
            if any(s != "pagedlab" for s in systems):
                hf_model = load_hf(args.model, dtype, device)
        else:
            hf_model = build_random_checkpoint(args.shape, model_dir, dtype, device, args.seed)
            hf_config = hf_model.config
            if systems == ["pagedlab"]:
                hf_model = None
                free_memory()
        log(f"model ready in {time.perf_counter() - t:.1f} s ({model_dir})")
        dims = model_dims(hf_config)
        args.max_model_len = min(args.max_model_len, hf_config.max_position_embeddings)
        work = make_workload(args, dims["vocab"], args.max_model_len)
        report["model"] = dims
        report["workload"] = {"name": args.workload, **workload_stats(work)}
        report["roofline"] = roofline(work, dims, report["ceilings"], args.max_num_seqs,
                                      dtype_bytes=torch.empty(0, dtype=dtype).element_size())
        log(f"roofline bound {report['roofline']['bound_s']:.3f} s = "
            f"{report['roofline']['output_tokens_per_s']:,.0f} output tok/s")
        save()

        if "pagedlab" in systems:
            # The transformers model stays on the GPU (it runs next): pagedlab's memory profile counts it as used,
            # so its KV cache is smaller than alone, and its own peak is reported net of it.
            log("pagedlab")
            resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            holder = {}

            def pagedlab():
                result, holder["llm"] = run_pagedlab(model_dir, work, args, device, dims)
                if device.type == "cuda":
                    result["other_resident_gib"] = gib(resident)
                    result["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated(device) - resident)
                return result
            report["systems"]["pagedlab"] = attempt("pagedlab", pagedlab)
            save()
            llm = holder.pop("llm", None)
            if llm is not None:
                ours = report["systems"]["pagedlab"]
                log(f"  {ours['generated_tokens'] / ours['wall_s']:,.0f} output tok/s in {ours['wall_s']:.2f} s")
                if not args.no_profile:
                    log("pagedlab decode-step breakdown")
                    report["profile"] = attempt("profile", lambda: profile_decode(llm, work, device))
                    save()
                if args.latency_requests:
                    rate = args.request_rate or DEFAULT_RATES.get(shape, 16.0)
                    log(f"pagedlab latency at {rate:g} req/s")
                    report["latency"] = attempt("latency", lambda: run_latency(llm, work, rate,
                                                                               args.latency_requests, args.seed))
                    save()
                if args.ab_unfused:
                    log("pagedlab with the fused element-wise kernels off")
                    report["ab_unfused"] = attempt("unfused", lambda: run_unfused(llm, work, device))
                    save()
            del llm
            free_memory()

        if "hf-generate" in systems:
            log("transformers generate, static batches")
            sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
            report["systems"]["transformers_generate"] = attempt(
                "generate", lambda: run_hf_generate(hf_model, work, sizes, device))
            free_memory()
            save()
        if "hf-generate-batch" in systems:
            log("transformers generate_batch (continuous batching)")
            report["systems"]["transformers_generate_batch"] = attempt(
                "generate_batch", lambda: run_hf_generate_batch(hf_model, work, device))
            free_memory()
            save()
    finally:
        del hf_model
        if not args.model:
            shutil.rmtree(model_dir, ignore_errors=True)

    save()
    try:
        plot(report, os.path.join(args.out, f"throughput_{shape}.png"))
    except Exception as exc:  # noqa: BLE001
        log(f"plot failed: {exc}")
    lat = report.get("latency", {})
    if "ttft_s" in lat:
        log(f"latency at {lat['request_rate']:g} req/s: TTFT p50 {lat['ttft_s'].get('p50', 0) * 1e3:.1f} ms "
            f"p99 {lat['ttft_s'].get('p99', 0) * 1e3:.1f} ms; ITL p50 "
            f"{lat['inter_token_latency_s'].get('p50', 0) * 1e3:.2f} ms p99 "
            f"{lat['inter_token_latency_s'].get('p99', 0) * 1e3:.2f} ms")
    if "decode_steps" in report.get("profile", {}):
        log(f"decode step breakdown (ms): {json.dumps(report['profile'].get('decode_steps'))}; graph replay "
            f"{json.dumps(report['profile'].get('graph_replay_ms'))}; logits+argmax "
            f"{report['profile'].get('logits_argmax_ms')}")
    print(summarize(report), flush=True)
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m pagedlab.entrypoints.bench"))
