"""The model-free simulator: the real LLMEngine, scheduler and allocators, with an executor that only counts.

Each request has a prompt length and an output length from a trace; every step its sequences produce one token,
and a cost model says how long the step would have taken on a GPU. Time is virtual: the clock jumps by each
step's modelled duration, so a day of traffic simulates in seconds.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import math
import operator
import time
from dataclasses import asdict, dataclass, field, fields
from operator import attrgetter

from pagedlab.config import DEFAULT_MAX_MODEL_LEN, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pagedlab.core.accounting import MemoryUsage
from pagedlab.engine.llm_engine import LLMEngine, StepStats
from pagedlab.sched_output import SampleResult, SchedulerOutput
from pagedlab.sampling_params import SamplingParams
from pagedlab.sim.cost_model import MODEL_SHAPES, CostModel
from pagedlab.sim.fast_forward import fast_forward
from pagedlab.sim.profiled_cost import ProfiledCostModel
from pagedlab.sim.profiles import load_profile
from pagedlab.sim.workloads import TraceRequest, load_trace, prompt_tokens


SIM_VOCAB = 31991


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimExecutor:
    """Returns a token for every sampling sequence and advances the virtual clock by the modelled step time."""
    holds_seqs = False      # it prices a step from the batch's columns: the scheduler sends no per-sequence diffs

    def __init__(self, cost: CostModel | ProfiledCostModel, clock: VirtualClock, block_size: int) -> None:
        self.cost = cost
        self.clock = clock
        self.block_size = block_size
        self.last_step_time = 0.0
        self._tokens: list[int] = []
        self._results: list[SampleResult] = []

    def execute(self, out: SchedulerOutput, grammar=None) -> list[SampleResult | None]:
        """A sampling row's result depends only on its length: one result per length serves every row (the engine
        only reads results), a fresh one where a row forks into k samples."""
        ends = list(map(operator.add, out.num_computed_tokens, out.num_scheduled_tokens))
        last_end = max(ends, default=0)
        if last_end >= len(self._results):
            self._results = [SampleResult([token]) for token in self.token_table(last_end)]
        shared, tokens = self._results, self._tokens
        results = [shared[end] if k == 1 else SampleResult([tokens[end]] * k) if k else None
                   for end, k in zip(ends, out.num_samples)]
        self.last_step_time = self.cost.batch_time(out, self.block_size)
        self.clock.now += self.last_step_time
        return results

    def execute_decode_run(self, num_seqs: int, context: int, longest: int, max_steps: int, deadline: float
                           ) -> tuple[list[float], list[float]]:
        """Up to `max_steps` decode steps of `num_seqs` sequences (`context` tokens computed in all, the longest
        `longest`), priced by the cost model and added to the clock; it stops before a step that starts at or after
        `deadline` (a request has arrived by then). Returns each step's duration and the clock at its end."""
        durations, times, now = [], [], self.clock.now
        for j in range(1, max_steps + 1):
            if j > 1 and deadline <= now:
                break
            context += num_seqs
            durations.append(self.cost.decode_time(num_seqs, context, longest + j))
            now += durations[-1]
            times.append(now)
        self.clock.now, self.last_step_time = now, durations[-1]
        return durations, times

    @staticmethod
    def token(end: int) -> int:
        """The token sampled after `end` tokens: any in-vocabulary id would do; distinct ones keep hashes apart."""
        return end % SIM_VOCAB

    def token_table(self, last_end: int) -> list[int]:
        """token(end) at index end, for every end up to last_end at least."""
        if last_end >= len(self._tokens):
            self._tokens = [self.token(end) for end in range(2 * last_end + 1)]
        return self._tokens


@dataclass
class SimConfig:
    """A simulation: the workload, the KV budget and cost model, and the engine settings the simulator models. Those
    share the engine's names and defaults (config.py declares them; `pagedlab sim` takes them as the same flags)."""
    workload: str = "sharegpt"             # a workload name (see workloads.WORKLOADS) or a .jsonl trace
    num_requests: int = 1000
    request_rate: float = math.inf         # requests/s (Poisson); inf = all arrive at once
    seed: int = ModelConfig.seed
    allocator: str = CacheConfig.allocator
    block_size: int = CacheConfig.block_size
    kv_tokens: int | None = None           # KV budget in token slots, or ...
    kv_gib: float | None = 4.0             # ... in GiB of the model shape's KV
    model: str | None = None               # a shape of MODEL_SHAPES; default: the profile's, else llama-3-8b
    max_model_len: int | None = SchedulerConfig.max_model_len
    max_num_seqs: int = SchedulerConfig.max_num_seqs
    max_num_batched_tokens: int | None = SchedulerConfig.max_num_batched_tokens
    enable_chunked_prefill: bool = SchedulerConfig.enable_chunked_prefill
    preemption_mode: str = SchedulerConfig.preemption_mode
    swap_space: float = CacheConfig.swap_space       # GiB of CPU swap
    enable_prefix_caching: bool = CacheConfig.enable_prefix_caching
    batching: str = SchedulerConfig.batching
    static_reservation: str = CacheConfig.static_reservation
    profile: str | dict | None = None      # a GPU profile (shipped name or path): measured step times
    cost: CostModel | ProfiledCostModel | None = None     # or any cost model; default: the roofline estimate
    timeline: bool = True                  # keep per-step rows (memory accounting every step)
    fast_forward: bool = True              # apply regular decode runs at once: the same results, faster

    def __post_init__(self) -> None:
        if self.max_model_len is None:     # no model to take the limit from
            self.max_model_len = DEFAULT_MAX_MODEL_LEN

    def cost_model(self) -> CostModel | ProfiledCostModel:
        """`cost` if given; else the profile's measured model; else the generic roofline model (estimated times)."""
        if self.cost is not None:
            return self.cost
        if self.profile is not None:
            cost = profiled_cost_model(self.profile) if isinstance(self.profile, str) else \
                ProfiledCostModel(self.profile)
            if self.model is not None and self.model != cost.model.name:
                raise ValueError(f"model {self.model!r} differs from the profile's shape {cost.model.name!r}: "
                                 f"leave model out or give a profile of {self.model}")
            return cost
        model = self.model or "llama-3-8b"
        if model not in MODEL_SHAPES:
            raise ValueError(f"unknown model shape {model!r}; choose one of {sorted(MODEL_SHAPES)}")
        return CostModel(model=MODEL_SHAPES[model])

    def num_blocks(self) -> int:
        kv_bytes = self.cost_model().model.kv_bytes_per_token
        tokens = self.kv_tokens if self.kv_tokens is not None else int(self.kv_gib * 2**30 / kv_bytes)
        return tokens // self.block_size

    def engine_config(self) -> EngineConfig:
        """The cache and scheduler configs from the settings of the same names (no model: the seed drives the trace)."""
        engine_names = {f.name for klass in (CacheConfig, SchedulerConfig) for f in fields(klass)}
        return EngineConfig.from_kwargs(**{f.name: getattr(self, f.name) for f in fields(self)
                                           if f.name in engine_names})


@functools.lru_cache(maxsize=8)
def profiled_cost_model(name_or_path: str) -> ProfiledCostModel:
    return ProfiledCostModel(load_profile(name_or_path))


@dataclass
class SimResult:
    config: SimConfig
    summary: dict
    records: list[tuple[StepStats, MemoryUsage]] = field(repr=False, default_factory=list)   # one per step
    requests: list[dict] = field(repr=False, default_factory=list)

    @functools.cached_property
    def steps(self) -> list[dict]:
        """A row per step: its StepStats, kv_usage, and its memory accounting as mem_* columns."""
        rows = []
        for stats, usage in self.records:
            # the simulator's own host times say nothing of the GPU it models (`duration` does)
            row = {k: v for k, v in vars(stats).items() if k not in StepStats.HOST_TIMES}
            row["kv_usage"] = stats.kv_usage
            for name, value in usage.as_dict().items():
                row["mem_" + name] = value
            rows.append(row)
        return rows

    def timeline(self):
        import pandas as pd
        return pd.DataFrame(self.steps)

    def request_frame(self):
        import pandas as pd
        return pd.DataFrame(self.requests)

    @property
    def cost_source(self) -> str:
        """"profile" when the step times were measured on a GPU (a profile), "roofline" when estimated."""
        return self.summary["cost_source"]

    def to_json(self) -> dict:
        cfg = asdict(self.config)
        cfg.pop("cost")
        if isinstance(cfg["profile"], dict):
            cfg["profile"] = cfg["profile"].get("name")
        cost = self.config.cost_model()
        cfg["cost_model"] = asdict(cost) if isinstance(cost, CostModel) else {"profile": cost.profile.get("name"),
                                                                              "fit_report": cost.fit_report}
        return {"config": cfg, "summary": self.summary, "steps": self.steps}


class Simulator:
    def __init__(self, config: SimConfig, trace: list[TraceRequest] | None = None) -> None:
        self.config = config
        self.trace = trace if trace is not None else load_trace(config.workload, config.num_requests, config.seed,
                                                                config.request_rate)
        self.cost = cost = config.cost_model()
        self.clock = VirtualClock()
        cpu_blocks = int(config.swap_space * 2**30 / cost.model.kv_bytes_per_token) // config.block_size
        self.executor = SimExecutor(cost, self.clock, config.block_size)
        self.engine = LLMEngine(config.engine_config(), self.executor, config.num_blocks(), cpu_blocks,
                                clock=self.clock, bytes_per_block=cost.model.kv_bytes_per_token * config.block_size)
        self.engine.report_unfinished = False

    def add(self, index: int, r: TraceRequest) -> None:
        params = SamplingParams(n=r.n, temperature=1.0, max_tokens=r.output_len, ignore_eos=True)
        self.engine.add_request({"prompt_token_ids": prompt_tokens(r, index)}, params, request_id=str(index),
                                arrival_time=r.arrival)

    def run(self, max_steps: int | None = None) -> SimResult:
        with _no_cycle_collection():
            return self._run(max_steps)

    def _run(self, max_steps: int | None) -> SimResult:
        engine, clock, cfg = self.engine, self.clock, self.config
        pending = sorted(range(len(self.trace)), key=lambda i: self.trace[i].arrival)
        next_arrival, records, outputs = 0, [], {}
        usage = None        # the engine's memory accounting, while nothing has changed since it was taken
        blocks_ran_out = False      # the last decode run stopped where the free blocks do not serve the next step
        started = time.perf_counter()
        while next_arrival < len(pending) or engine.has_unfinished_requests():
            if not engine.has_unfinished_requests():
                clock.now = max(clock.now, self.trace[pending[next_arrival]].arrival)
            while next_arrival < len(pending) and self.trace[pending[next_arrival]].arrival <= clock.now:
                self.add(pending[next_arrival], self.trace[pending[next_arrival]])
                next_arrival += 1
                usage = None    # the next request's size is part of a static allocator's accounting
            arrival = self.trace[pending[next_arrival]].arrival if next_arrival < len(pending) else math.inf
            run = fast_forward(engine, self.executor, arrival, max_steps, usage) \
                if cfg.fast_forward and not blocks_ran_out else None
            blocks_ran_out = run is not None and run.blocks_run_out
            if run is not None:
                outputs.update((output.request_id, output) for output in run.finished)
                usage = run.steps[-1][1]
                if cfg.timeline:
                    records.extend(run.steps)
            else:
                for output in engine.step():
                    if output.finished:
                        outputs[output.request_id] = output
                usage = engine.memory_usage() if cfg.timeline else None
                if cfg.timeline:
                    records.append((engine.last_step, usage))
            if max_steps is not None and engine.scheduler.step_id >= max_steps:
                break
        wall = time.perf_counter() - started
        return SimResult(cfg, self._summary(outputs, records, wall), records, self._request_rows(outputs))

    def _request_rows(self, outputs: dict) -> list[dict]:
        rows = []
        for rid, o in outputs.items():
            m = o.metrics
            rows.append({"request_id": rid, "prompt_tokens": len(o.prompt_token_ids),
                         "output_tokens": sum(len(c.token_ids) for c in o.outputs), "arrival": m.arrival_time,
                         "first_scheduled": m.first_scheduled_time, "first_token": m.first_token_time,
                         "last_token": m.last_token_time, "finished": m.finished_time,
                         "ttft": m.time_to_first_token, "e2e": m.e2e_latency,
                         "preemptions": m.num_preemptions, "cached_tokens": m.num_cached_tokens,
                         "error": o.error})
        return rows

    def _summary(self, outputs: dict, records: list[tuple[StepStats, MemoryUsage]], wall: float) -> dict:
        engine, totals = self.engine, self.engine.totals
        ok = [o for o in outputs.values() if o.error is None]
        sim_time = self.clock.now or 1e-12
        out_tokens = sum(len(c.token_ids) for o in ok for c in o.outputs)
        in_tokens = sum(len(o.prompt_token_ids) for o in ok)
        ttft = sorted(o.metrics.time_to_first_token for o in ok if o.metrics.time_to_first_token is not None)
        e2e = sorted(o.metrics.e2e_latency for o in ok if o.metrics.e2e_latency is not None)
        gaps = [(o.metrics.last_token_time - o.metrics.first_token_time,
                 max(len(c.token_ids) for c in o.outputs) - 1) for o in ok if o.metrics.first_token_time is not None]
        summary = {
            "allocator": self.config.allocator, "workload": self.config.workload, "requests": len(self.trace),
            "finished": len(ok), "rejected": len(outputs) - len(ok), "steps": engine.scheduler.step_id,
            "kv_blocks": engine.kv.num_blocks, "block_size": self.config.block_size,
            "kv_capacity_tokens": engine.kv.num_blocks * self.config.block_size,
            "simulated_seconds": sim_time, "throughput_requests_per_s": len(ok) / sim_time,
            "throughput_output_tokens_per_s": out_tokens / sim_time,
            "throughput_total_tokens_per_s": (in_tokens + out_tokens) / sim_time,
            "preemptions": totals["preemptions"], "mean_ttft_s": _mean(ttft), "p50_ttft_s": _pct(ttft, 50),
            "p99_ttft_s": _pct(ttft, 99),
            # every gap between two tokens of a request, averaged (token times are step ends, as in the engine)
            "mean_itl_s": sum(g for g, _ in gaps) / max(sum(k for _, k in gaps), 1),
            "mean_e2e_s": _mean(e2e), "p99_e2e_s": _pct(e2e, 99),
            "prefix_cache_hit_rate": engine.kv.prefix_hits / engine.kv.prefix_queries
            if engine.kv.prefix_queries else 0.0,
            "cost_source": self.cost.source, "cost_model": self.cost.describe(),
            "sim_wall_seconds": wall, "sim_requests_per_minute": len(self.trace) / wall * 60 if wall else 0.0,
        }
        if records:
            stats = [stat for stat, _ in records]
            busy = [usage for stat, usage in records if stat.num_running_seqs > 0]
            running = list(map(attrgetter("num_running_seqs"), stats))

            def total(values, name: str):
                return sum(map(attrgetter(name), values))
            summary.update({
                "peak_running_seqs": max(running),
                "mean_running_seqs": _mean([r for r in running if r > 0]),
                "swapped_out_blocks": total(stats, "num_swapped_out_blocks"),
                "swapped_in_blocks": total(stats, "num_swapped_in_blocks"),
                "copied_blocks": total(stats, "num_copied_blocks"),
                # Slot-weighted over the run: of all slots allocated at some step, the share holding tokens.
                "memory_utilization": total(busy, "tokens") / (total(busy, "allocated") or 1),
                "mean_kv_usage": _mean(map(attrgetter("usage"), busy)),
            })
            capacities = list(map(attrgetter("capacity"), busy))
            for kind in ("tokens", "internal", "reserved", "external", "free", "shared_saved"):
                summary[f"mean_{kind}_fraction"] = _mean(map(operator.truediv, map(attrgetter(kind), busy),
                                                             capacities))
        return summary


@contextlib.contextmanager
def _no_cycle_collection():
    """A run makes no reference cycles, only objects it keeps (requests, tokens, step rows): the cyclic garbage
    collector would walk that growing heap again and again for nothing (about a tenth of the run on ShareGPT), so
    it pauses while the run goes, and whatever a listener or cost model leaves in cycles is collected after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(round(q / 100 * (len(sorted_values) - 1))))]


def compare(base: SimConfig, **variants) -> dict[str, SimResult]:
    """Run the same trace under several configs: compare(cfg, paged={}, static={'allocator': 'static'})."""
    from dataclasses import replace

    trace = load_trace(base.workload, base.num_requests, base.seed, base.request_rate)
    return {name: Simulator(replace(base, **changes), trace).run() for name, changes in variants.items()}
