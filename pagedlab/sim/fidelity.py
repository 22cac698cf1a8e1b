"""The real engine and the simulator on the same trace and configuration, measured the same way.

Both stamp a token when the scheduler's update takes it (the end of the step that computed it); a request's arrival
is its trace time after the run's start; the engine steps while it has work. Figures, from the requests:
  output throughput  output tokens / (end of the last step - start)
  TTFT               first token - arrival (mean, p99)
  ITL                every gap between two tokens of a request, averaged over all gaps
  preemptions        the scheduler's count
benchmarks/bench_sim_fidelity.py runs this on a GPU for several traces; tests/test_sim_fidelity.py on the CPU.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

from pagedlab.engine.llm_engine import LLMEngine
from pagedlab.sampling_params import SamplingParams
from pagedlab.sim.profiler import run_engine
from pagedlab.sim.simulator import SimConfig, Simulator
from pagedlab.sim.workloads import TraceRequest, prompt_tokens

FIGURES = ("output_tokens_per_s", "mean_ttft_s", "p99_ttft_s", "mean_itl_s", "preemptions")
TARGETS = {"output_tokens_per_s": 0.05, "mean_itl_s": 0.05, "mean_ttft_s": 0.10}   # |relative error| at most


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), for both sides alike."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q / 100 * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def figures(rows: list[tuple[float, float, float, int]], duration: float, preemptions: int) -> dict:
    """rows: (arrival, first token, last token, output tokens) of each finished request."""
    if not rows:
        raise ValueError("no request finished: every one was rejected (does max_model_len fit the trace?)")
    ttft = [first - arrival for arrival, first, _, _ in rows]
    gaps = sum(last - first for _, first, last, _ in rows)
    count = sum(tokens - 1 for *_, tokens in rows)
    return {"requests": len(rows), "output_tokens": sum(r[3] for r in rows), "duration_s": duration,
            "output_tokens_per_s": sum(r[3] for r in rows) / duration, "mean_ttft_s": sum(ttft) / len(ttft),
            "p99_ttft_s": percentile(ttft, 99), "mean_itl_s": gaps / max(count, 1), "preemptions": preemptions}


def engine_like(engine: LLMEngine, num_blocks: int | None = None, enable_prefix_caching: bool = False,
                clock=None) -> LLMEngine:
    """A fresh engine on the same model runner (weights, KV cache, CUDA graphs): `num_blocks` of its blocks."""
    config = dataclasses.replace(engine.config, cache=dataclasses.replace(
        engine.config.cache, enable_prefix_caching=enable_prefix_caching))
    runner = engine.executor
    return LLMEngine(config, runner, num_blocks or engine.kv.num_blocks, engine.kv.num_cpu_blocks,
                     eos_token_ids=runner.eos_token_ids, bytes_per_block=runner.bytes_per_block,
                     vocab_size=runner.hf_config.vocab_size, clock=clock or engine.clock)


def run_real(engine: LLMEngine, trace: list[TraceRequest], log_steps: bool = False) -> dict:
    """log_steps: keep every step's (end time, runner seconds, tokens, prefill tokens, sequences) as well."""
    vocab = min(32000, engine.vocab_size or 32000)
    requests = [(prompt_tokens(r, i, vocab), SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True,
                                                           n=r.n), r.arrival) for i, r in enumerate(trace)]
    log = []

    def on_step():
        s = engine.last_step
        log.append((round(s.time, 6), round(s.duration, 6), s.num_batched_tokens, s.num_prefill_tokens,
                    s.num_decode_seqs))

    wall = time.perf_counter()
    added, start, end = run_engine(engine, requests, on_step=on_step if log_steps else None, clock=engine.clock)
    rows = [(r.arrival_time - start, r.first_token_time - start, r.last_token_time - start,
             max(len(s.output_token_ids) for s in r.seqs)) for r in added if r.error is None]
    result = figures(rows, end - start, engine.scheduler.num_preemptions) | {"wall_s": time.perf_counter() - wall,
                                                                               "steps": engine.scheduler.step_id}
    if log_steps:
        result["step_log"] = {"columns": ["end_s", "runner_s", "tokens", "prefill_tokens", "decode_seqs"],
                              "rows": [(round(t - start, 6), *rest) for t, *rest in log]}
    return result


def median_of_runs(runs: list[dict]) -> tuple[dict, dict]:
    """Each figure's median over the runs (the first run's step log kept) and its [min, max]."""
    median, spread = dict(runs[0]), {}
    for key in FIGURES + ("duration_s", "wall_s", "steps"):
        values = [r[key] for r in runs]
        median[key] = statistics.median_low(values) if isinstance(values[0], int) else statistics.median(values)
        spread[key] = [min(values), max(values)]
    return median, spread


def run_real_repeated(engine: LLMEngine, trace: list[TraceRequest], repeats: int = 3, discard: int = 1,
                      num_blocks: int | None = None, enable_prefix_caching: bool = False
                      ) -> tuple[dict, dict, LLMEngine]:
    """The trace on `discard` + `repeats` fresh engines over `engine`'s runner (an empty prefix cache and queue each
    time). The first `discard` runs are dropped: a fresh engine's first run is slower (19% on the CPU test, its
    allocations and caches warming up). Returns each figure's median over the kept runs (the first kept run's step
    log), its [min, max], and the last engine (for the simulator's configuration)."""
    runs = []
    for i in range(discard + repeats):
        real_engine = engine_like(engine, num_blocks, enable_prefix_caching)
        run = run_real(real_engine, trace, log_steps=i == discard)
        if i >= discard:
            runs.append(run)
    median, spread = median_of_runs(runs)
    return median, spread, real_engine


def sim_config(engine: LLMEngine, profile, trace_name: str, num_requests: int, request_rate: float,
               num_blocks: int | None = None, enable_prefix_caching: bool = False) -> SimConfig:
    """The simulator configured as `engine` is, with the same KV blocks."""
    config = engine.config
    blocks = num_blocks or engine.kv.num_blocks
    return SimConfig(workload=trace_name, num_requests=num_requests, request_rate=request_rate,
                     block_size=config.cache.block_size, kv_tokens=blocks * config.cache.block_size, kv_gib=None,
                     max_model_len=config.scheduler.max_model_len, max_num_seqs=config.scheduler.max_num_seqs,
                     max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                     preemption_mode=config.scheduler.preemption_mode, enable_prefix_caching=enable_prefix_caching,
                     profile=profile, timeline=False)


def run_sim(config: SimConfig, trace: list[TraceRequest]) -> dict:
    wall = time.perf_counter()
    result = Simulator(config, trace).run()
    rows = [(r["arrival"], r["first_token"], r["last_token"], r["output_tokens"]) for r in result.requests
            if r["error"] is None]
    return figures(rows, result.summary["simulated_seconds"], result.summary["preemptions"]) | {
        "wall_s": time.perf_counter() - wall, "steps": result.summary["steps"], "cost_source": result.cost_source}


def errors(real: dict, sim: dict) -> dict:
    """(sim - real) / real for each figure; the preemption count's difference as it is."""
    out = {}
    for key in FIGURES:
        if key == "preemptions":
            out[key] = sim[key] - real[key]
        else:
            out[key] = (sim[key] - real[key]) / real[key] if real[key] else math.nan
    return out


def within_targets(err: dict) -> dict:
    return {key: abs(err[key]) <= bound for key, bound in TARGETS.items()}
