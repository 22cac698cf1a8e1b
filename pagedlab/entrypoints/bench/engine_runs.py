"""pagedlab's runs: `LLM(dir).generate(...)` timed twice on the workload (the first run shows what startup left to
compile, the second is steady state), the Poisson latency run, and the fused-ops A/B in a child process.

Everything is seen through the engine's STEP events (StepStats: the batch, the KV blocks in use and each phase's
host time); nothing in the engine is wrapped or patched."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from pagedlab import events as ev
from pagedlab.entrypoints.bench.common import gib, percentiles, sync
from pagedlab.entrypoints.bench.step_split import decode_period_ms, step_seconds


class StepLog:
    """The StepStats of every step while open, and the KV cache's utilization every `kv_every` steps (a pass over
    the block tables, so not every step)."""

    def __init__(self, engine, kv_every: int = 8) -> None:
        self.engine, self.kv_every = engine, kv_every
        self.steps: list = []
        self.kv: list[tuple[float, float, int]] = []
        self.close = engine.bus.subscribe(self._on_step, {ev.STEP})

    def _on_step(self, event: ev.Event) -> None:
        stats = event.data["stats"]
        self.steps.append(stats)
        if stats.step % self.kv_every == 0:
            usage = self.engine.kv.usage()
            self.kv.append((usage.utilization, usage.usage, usage.tokens))

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def sampling_params(work):
    from pagedlab import SamplingParams
    if len({o for _, o in work}) == 1:
        return SamplingParams(temperature=0, max_tokens=work[0][1], ignore_eos=True)
    return [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]


def timed_run(llm, work, device) -> tuple[dict, list]:
    """One `generate` over the workload: its figures, and the StepStats of its steps."""
    engine = llm.llm_engine
    params, prompts = sampling_params(work), [{"prompt_token_ids": p} for p, _ in work]
    preemptions = engine.scheduler.num_preemptions
    with StepLog(engine) as log:
        sync(device)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        sync(device)
        elapsed = time.perf_counter() - start
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    errors = [o.error for o in outputs if o.error]
    decode = [step_seconds(s) for s in log.steps if s.num_prefill_tokens == 0]
    prefill = [step_seconds(s) for s in log.steps if s.num_prefill_tokens]
    slowest = sorted(log.steps, key=step_seconds, reverse=True)[:6]
    result = {
        "wall_s": elapsed, "generated_tokens": generated, "output_tokens_per_s": generated / elapsed,
        "expected_tokens": sum(o for _, o in work), "errors": errors[:3], "num_errors": len(errors),
        "steps": len(log.steps), "preemptions": engine.scheduler.num_preemptions - preemptions,
        "kv_utilization_mean": sum(k[0] for k in log.kv) / len(log.kv) if log.kv else None,
        "kv_usage_peak": max((k[1] for k in log.kv), default=None),
        "kv_tokens_peak": max((k[2] for k in log.kv), default=None),
        "step_time_s": {"decode_steps": len(decode), "decode_total": sum(decode),
                        "decode_median_ms": 1e3 * sorted(decode)[len(decode) // 2] if decode else None,
                        "prefill_steps": len(prefill), "prefill_total": sum(prefill),
                        "slowest": [{"ms": round(1e3 * step_seconds(s), 2), "tokens": s.num_batched_tokens,
                                     "prefill_tokens": s.num_prefill_tokens} for s in slowest]},
    }
    return result, log.steps


def run_pagedlab(model_dir: str, work, second_work, kwargs: dict, device, vocab: int, warm_up: bool = True
                 ) -> tuple[dict, list, object]:
    """Startup (+ the bench's warm-up), then the first and the second timed run, on other tokens of the same
    lengths (no prefix-cache hits between them). The headline figures are the first run's, as a user meets them.
    Returns the result, the second run's StepStats and the LLM."""
    import torch
    from pagedlab import LLM

    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    llm = LLM(model_dir, **kwargs)
    engine = llm.llm_engine
    if warm_up:
        warm_up_pagedlab(llm, vocab)
    startup_s = time.perf_counter() - start
    from pagedlab.kernels import compile_guard
    before = compile_guard.compiles_after_startup()
    first, _ = timed_run(llm, work, device)
    during_first = compile_guard.compiles_after_startup() - before
    second, steps = timed_run(llm, second_work, device)
    scheduling = scheduling_ab(llm, second_work, device, second, steps)
    report = engine.kv_budget
    result = {
        **first, "startup_s": startup_s, "bench_warm_up": warm_up,
        "triton_compiles": {"first_run": during_first, "second_run": compile_guard.compiles_after_startup()
                            - before - during_first, "late": compile_guard.stats()["late_compiles"]},
        "first_run": summary(first), "second_run": summary(second),
        "async_scheduling": engine.async_scheduling,
        "scheduling_ab": scheduling,
        "first_over_second": first["output_tokens_per_s"] / second["output_tokens_per_s"],
        "kv_cache_gib": gib(report.get("kv_cache")), "kv_blocks": report.get("num_gpu_blocks"),
        "kv_tokens_capacity": report.get("num_gpu_blocks", 0) * engine.config.cache.block_size,
        "cuda_graph_batch_sizes": list(getattr(engine.executor, "graph_batch_sizes", [])),
        "config": dict(kwargs),
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
        result["peak_gpu_reserved_gib"] = gib(torch.cuda.max_memory_reserved(device))
    return result, steps, llm


def scheduling_ab(llm, work, device, second: dict, steps: list) -> dict:
    """The second run (in the engine's own scheduling mode) and, where the executor can step both ways, the same
    workload once more with async scheduling switched the other way: {"async_on" | "async_off": its figures and
    its decode step's period (decode_period_ms)}."""
    engine = llm.llm_engine
    runs = {"async_on" if engine.async_scheduling else "async_off": (second, steps)}
    if getattr(engine.executor, "supports_async_scheduling", False):
        engine.async_scheduling = not engine.async_scheduling
        try:
            runs["async_on" if engine.async_scheduling else "async_off"] = timed_run(llm, work, device)
        finally:
            engine.async_scheduling = not engine.async_scheduling
    return {mode: {**summary(run), "decode_period_ms": decode_period_ms(run_steps)}
            for mode, (run, run_steps) in runs.items()}


def summary(run: dict) -> dict:
    keys = ("wall_s", "generated_tokens", "output_tokens_per_s", "steps", "preemptions", "num_errors")
    return {**{k: run[k] for k in keys}, "decode_median_step_ms": run["step_time_s"]["decode_median_ms"],
            "slowest_step_ms": run["step_time_s"]["slowest"][0]["ms"] if run["step_time_s"]["slowest"] else None}


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


def run_unfused(model_dir: str, work, kwargs: dict) -> dict:
    """The same throughput run with pagedlab.layers.fused_ops off (PAGEDLAB_FUSED_OPS=0: torch element-wise
    layers), in a child process of its own, so nothing in this one is switched."""
    with tempfile.TemporaryDirectory(prefix="pagedlab-unfused-") as tmp:
        spec, result = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec, "w") as f:
            json.dump({"model_dir": model_dir, "work": work, "kwargs": kwargs}, f)
        code = ("import sys; from pagedlab.entrypoints.bench.engine_runs import unfused_child; "
                "unfused_child(*sys.argv[1:])")
        subprocess.run([sys.executable, "-c", code, spec, result], check=True,
                       env={**os.environ, "PAGEDLAB_FUSED_OPS": "0"})
        with open(result) as f:
            return json.load(f)


def unfused_child(spec_path: str, result_path: str) -> None:
    import torch

    from pagedlab import LLM
    from pagedlab.layers import fused_ops

    with open(spec_path) as f:
        spec = json.load(f)
    work = [(p, o) for p, o in spec["work"]]
    llm = LLM(spec["model_dir"], **spec["kwargs"])
    warm_up_pagedlab(llm, llm.llm_engine.vocab_size)
    run, _ = timed_run(llm, work, torch.device(spec["kwargs"]["device"]))
    with open(result_path, "w") as f:
        json.dump({"fused_ops": fused_ops.ENABLED, **summary(run)}, f)
