"""What /metrics and /stats report, read from the engine's own instrumentation.

Prometheus metrics follow the engine's EventBus: every `step` event carries the step's StepStats (queue lengths,
KV blocks in use) and is the moment the counters catch up with `engine.totals` and the KV cache manager's prefix
counters; every `request_finished` event gives a finished request's latencies. Both live in the engine core process
(core_proc.py), which answers the API servers' /metrics and /stats between two steps. `with_vllm_names` repeats the
exposition under vLLM's names (--metrics-prefix vllm), so dashboards built for vLLM find them.
"""
from __future__ import annotations

import re
from collections import Counter as Tally
from dataclasses import asdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from pagedlab import events as ev
from pagedlab.engine.llm_engine import LLMEngine, StepStats
from pagedlab.kernels import compile_guard
from pagedlab.sequence import Request

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class EngineMetrics:
    def __init__(self, engine: LLMEngine, registry: CollectorRegistry) -> None:
        self.engine = engine

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pagedlab:{name}", doc, registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"pagedlab:{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"pagedlab:{name}", doc, buckets=LATENCY_BUCKETS, registry=registry)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be admitted.")
        self.swapped = gauge("num_requests_swapped", "Requests swapped out to CPU blocks.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).")
        self.late_compiles = gauge("triton_compiles_after_startup",
                                   "Triton kernels compiled while serving (0: the startup warm-up covered them).")
        # The counters mirror cumulative engine figures; `_seen` holds what they were already advanced by.
        self.mirrored = {
            "prefix_queries": counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            "prefix_hits": counter("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
            "preemptions": counter("num_preemptions", "Requests preempted (recompute or swap)."),
            "prompt_tokens": counter("prompt_tokens", "Prompt tokens computed (prefill, recomputation included)."),
            "generation_tokens": counter("generation_tokens", "Tokens generated."),
        }
        self._seen = dict.fromkeys(self.mirrored, 0)
        self.request_success = counter("request_success", "Requests finished, by finish reason.",
                                       ("finished_reason",))
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between a request's tokens.")
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.")
        cache, sched = engine.config.cache, engine.config.scheduler
        Info("pagedlab:cache_config", "KV cache configuration.", registry=registry).info({
            "block_size": str(cache.block_size), "num_gpu_blocks": str(engine.kv.num_blocks),
            "num_cpu_blocks": str(engine.kv.num_cpu_blocks),
            "enable_prefix_caching": str(cache.enable_prefix_caching), "cache_dtype": cache.kv_cache_dtype,
            "allocator": cache.allocator, "preemption_mode": sched.preemption_mode,
            "max_model_len": str(sched.max_model_len), "gpu_memory_utilization": str(cache.gpu_memory_utilization)})
        engine.bus.subscribe(self._on_event)

    def _on_event(self, event: ev.Event) -> None:
        if event.kind == ev.STEP:
            self._on_step(event.data["stats"])
        elif event.kind == ev.REQUEST_FINISHED:
            self._on_finished(event.data["request"], event.data["reason"])

    def _on_step(self, stats: StepStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.swapped.set(stats.num_swapped)
        self.kv_usage.set(stats.kv_usage)
        self.late_compiles.set(compile_guard.compiles_after_startup())
        kv, totals = self.engine.kv, self.engine.totals
        current = {"prefix_queries": kv.prefix_queries, "prefix_hits": kv.prefix_hits, **totals}
        for name, counter in self.mirrored.items():
            counter.inc(current[name] - self._seen[name])
            self._seen[name] = current[name]

    def _on_finished(self, request: Request, reason: str) -> None:
        self.request_success.labels(finished_reason=reason).inc()
        if request.first_token_time is not None:
            self.time_to_first_token.observe(request.first_token_time - request.arrival_time)
        for earlier, later in zip(request.token_times, request.token_times[1:]):
            self.inter_token_latency.observe(later - earlier)
        self.e2e_latency.observe(request.finished_time - request.arrival_time)


def block_kind(ref_count: int, cached: bool) -> str:
    """free, cached (free but still holding a findable prefix), used (one owner) or shared (several)."""
    if ref_count == 0:
        return "cached" if cached else "free"
    return "used" if ref_count == 1 else "shared"


def engine_stats(engine: LLMEngine) -> dict:
    """The memory picture for a dashboard; the engine core computes it between two steps (/stats)."""
    snapshot = engine.snapshot()
    blocks = Tally(block_kind(b.ref_count, b.cached) for b in snapshot.blocks)
    requests: dict[str, dict] = {}
    for seq in snapshot.seqs:
        entry = requests.setdefault(seq.request_id, {"request_id": seq.request_id, "status": seq.status,
                                                     "num_seqs": 0, "gpu_blocks": set(), "cpu_blocks": set()})
        entry["num_seqs"] += 1
        entry["gpu_blocks"].update(seq.block_table)
        entry["cpu_blocks"].update(seq.cpu_block_table)
    for entry in requests.values():
        entry["gpu_blocks"], entry["cpu_blocks"] = len(entry["gpu_blocks"]), len(entry["cpu_blocks"])
    sched = engine.scheduler
    return {
        "step": snapshot.step, "allocator": snapshot.allocator, "block_size": snapshot.block_size,
        "num_blocks": snapshot.num_blocks,
        "queues": {"running": len(sched.running), "waiting": len(sched.waiting), "swapped": len(sched.swapped)},
        "blocks": {kind: blocks[kind] for kind in ("free", "cached", "used", "shared")},
        "memory": snapshot.usage,
        "requests": list(requests.values()),
        "totals": dict(engine.totals),
        "last_step": None if engine.last_step is None else asdict(engine.last_step),
    }


_SAMPLE = re.compile(rb"^pagedlab:([^\s{]+)(?:\{(.*)\})? (.*)$")


def with_vllm_names(exposition: bytes, model_name: str) -> bytes:
    """The pagedlab: metrics again as vllm:..., labelled with model_name as vLLM's are (the names after the colon
    are already vLLM's)."""
    model_label = b'model_name="' + model_name.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'
    extra = []
    for line in exposition.splitlines():
        if line.startswith((b"# HELP pagedlab:", b"# TYPE pagedlab:")):
            extra.append(line.replace(b" pagedlab:", b" vllm:", 1))
        elif (sample := _SAMPLE.match(line)) is not None:
            name, labels, value = sample.groups()
            labels = model_label + (b"," + labels if labels else b"")
            extra.append(b"vllm:" + name + b"{" + labels + b"} " + value)
    return exposition + b"\n".join(extra) + b"\n"
