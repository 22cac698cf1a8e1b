"""`pagedlab profile`: measure where the real engine's step time goes on this machine, for the simulator.

It builds the engine as served (`build_engine`: the KV cache sized from memory, CUDA graphs captured) and times
`ModelRunner.execute` (batch preparation, upload, forward, logits, sampling: what a step spends outside the
scheduler) on synthetic batches over a grid:
  decode   every CUDA-graph bucket (or batch size, without graphs) x contexts from 128 to max_model_len, and a few
           batches that a bucket pads;
  eager    prefill chunks from 16 to max_num_batched_tokens over cached prefixes of several lengths, packed
           prompts, and mixed steps (decoding sequences + a prompt chunk);
  moves    swap-out, swap-in and copy-on-write copies of 1 to 64 blocks.
Then a short real run (a ShareGPT-like trace of its own seed, offline) gives the host's time per step (scheduling,
update, outputs: the engine is synchronous, the GPU idles meanwhile) against the batch's size, and checks the
runner model on real steps.

Methodology (issue 13: leases disagreed by 20-33% when Triton compiled mid-profile): the engine's startup warm-up
(executor/warmup.py) has compiled every kernel variant before the first timing, and the profile records how many
compiled during it anyway (`methodology.triton_compiles_during_profile`, 0 when sound). Every grid cell discards
its first run (`warmup` runs), times `repeats` more (default 3), and keeps the median as `seconds`, with the
min/max of those runs beside it (`spread`, `seconds_spread`), so a noisy cell is visible in the JSON. `ProfiledCostModel` (sim/profiled_cost.py) turns the JSON into step times; its fit
residuals and the real-step check are written into the profile.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import NamedTuple

from pagedlab.sched_output import CachedSeqData, NewSeqData, SchedulerOutput
from pagedlab.sampling_params import SamplingParams
from pagedlab.sequence import Request
from pagedlab.sim.cost_model import MODEL_SHAPES
from pagedlab.sim.profiles import FORMAT

GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
DEFAULT_REPEATS = 3
DEFAULT_WARMUP = 1


class Timing(NamedTuple):
    """A cell's timed runs: their median (what the cost model reads) and their spread."""
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, times: list[float]) -> "Timing":
        return cls(statistics.median(times), min(times), max(times))

    @property
    def spread(self) -> list[float]:
        return [self.low, self.high]


def synthetic_batch(chunks: list[tuple[int, int]], kv, vocab: int, variant: int = 0) -> SchedulerOutput:
    """A step computing `new` tokens over `cached` ones for each (new, cached) chunk, every sequence sampling and
    sent whole, its blocks allocated by the engine's own KV cache manager (so the batch's preparation costs what it
    costs when served); `release` gives them back. If the cache cannot hold the batch, its sequences share
    blocks. The output also tells the runner to forget its sequences first, so it can be executed again and again
    (each time a new prefill's cost)."""
    out = SchedulerOutput(step=0)
    out.made = []
    for i, (new, cached) in enumerate(chunks):
        ids = [3 + (i * 7919 + j + variant) % (vocab - 3) for j in range(new + cached)]
        request = Request(f"profile-{variant}-{i}", ids, GREEDY)
        seq = request.seqs[0]
        seq.num_computed_tokens = cached
        if not kv.allocate_slots(request, seq, new):
            release(kv, out)
            return _shared_blocks_batch(chunks, kv.block_size, kv.num_blocks, vocab)
        out.made.append((request, seq))
        _add_row(out, request, new, cached, kv.block_table(seq))
    return out


def _add_row(out: SchedulerOutput, request: Request, new: int, cached: int, block_ids: list[int]) -> None:
    seq = request.seqs[0]
    out.seq_ids.append(seq.seq_id)
    out.finished_seq_ids.append(seq.seq_id)
    out.num_scheduled_tokens.append(new)
    out.num_computed_tokens.append(cached)
    out.num_samples.append(1)
    out.new_seqs.append(NewSeqData(seq.seq_id, request.request_id, 0, list(seq.token_ids), seq.num_prompt_tokens,
                                   block_ids, request.sampling_params))


def _shared_blocks_batch(chunks, block_size: int, num_blocks: int, vocab: int) -> SchedulerOutput:
    out, next_block = SchedulerOutput(step=0), 0
    out.made = []
    for i, (new, cached) in enumerate(chunks):
        request = Request(f"profile-{i}", [3 + (i * 7919 + j) % (vocab - 3) for j in range(new + cached)], GREEDY)
        width = -(-(new + cached) // block_size)
        _add_row(out, request, new, cached, [(next_block + k) % num_blocks for k in range(width)])
        next_block += width
    return out


def held(out: SchedulerOutput) -> SchedulerOutput:
    """The same step for a worker that already holds its sequences (sent by `out`): nothing new to apply."""
    ids = [new.seq_id for new in out.new_seqs]
    return replace(out, new_seqs=[], finished_seq_ids=[],
                   cached_seqs=CachedSeqData(ids, [[] for _ in ids], [[] for _ in ids]))


def forget(runner, out: SchedulerOutput) -> None:
    """The worker drops the batch's sequences."""
    runner.execute(SchedulerOutput(step=0, finished_seq_ids=[new.seq_id for new in out.new_seqs]))


def release(kv, out: SchedulerOutput) -> None:
    for _, seq in out.made:
        kv.free(seq)
    out.made = []


def powers_of_two(lo: int, hi: int) -> list[int]:
    values, v = [], lo
    while v < hi:
        values.append(v)
        v *= 2
    return values + [hi]


def decode_grid(runner, config) -> tuple[list[int], list[int]]:
    sched = config.scheduler
    sizes = list(runner.graph_batch_sizes) or powers_of_two(1, sched.max_num_seqs)
    contexts = powers_of_two(max(16, min(128, sched.max_model_len // 8)), sched.max_model_len)
    return sizes, contexts


def eager_grid(config) -> list[list[tuple[int, int]]]:
    """Batches (lists of (new, cached) chunks) that run eagerly: prompts, prompt chunks over cached prefixes,
    packed prompts and mixed steps."""
    sched = config.scheduler
    max_len, budget, max_seqs = sched.max_model_len, sched.max_num_batched_tokens, sched.max_num_seqs
    batches = [[(q, 0)] for q in powers_of_two(16, min(max_len, budget))]
    for prefix in (max_len // 4, 3 * max_len // 4):
        batches += [[(q, prefix)] for q in (16, 128, 512) if prefix + q <= max_len and q <= budget]
    for length in sorted({min(256, max_len), max_len}):
        for total in sorted({4 * length, budget}):
            count = min(total // length, max_seqs)
            if count > 1 and count * length <= budget:
                batches.append([(length, 0)] * count)
    for decoding in sorted({8, 32, 128, max_seqs - 1} & set(range(1, max_seqs))):
        for context in sorted({min(256, max_len), max_len // 2}):
            for q in (64, 512):
                if decoding + q <= budget and q <= max_len:
                    batches.append([(1, context - 1)] * decoding + [(q, 0)])
    if max_seqs > 32:       # a full batch admitting several short prompts (an Alpaca-like steady state)
        for context in sorted({min(256, max_len), max_len // 2}):
            batches.append([(1, context - 1)] * (max_seqs - 16) + [(24, 0)] * 16)
    decoding = max_seqs - 1
    if budget - decoding >= 16:
        batches.append([(1, min(512, max_len) - 1)] * decoding + [(min(budget - decoding, max_len), 0)])
    return batches


class Profiler:
    def __init__(self, engine, warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS,
                 clock=time.perf_counter) -> None:
        import torch
        self.clock = clock
        self.torch = torch
        self.engine = engine
        self.runner = engine.executor
        self.config = engine.config
        self.num_blocks = engine.kv.num_blocks
        self.vocab = self.runner.hf_config.vocab_size
        self.warmup, self.repeats = warmup, repeats
        self.cuda = self.runner.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def timed(self, fn) -> float:
        """Wall time of fn(), the GPU drained before and after."""
        self.sync()
        start = self.clock()
        fn()
        self.sync()
        return self.clock() - start

    def time_call(self, fn) -> Timing:
        """fn() timed `repeats` times after `warmup` discarded calls."""
        for _ in range(self.warmup):
            fn()
        return Timing.of([self.timed(fn) for _ in range(self.repeats)])

    def time_batch(self, chunks: list[tuple[int, int]]) -> Timing:
        """ModelRunner.execute on the batch, repeated as it is, its sequences held by the runner (as served: a
        decode step sends diffs)."""
        out = synthetic_batch(chunks, self.engine.kv, self.vocab)
        try:
            self.runner.execute(out)
            again = held(out)
            return self.time_call(lambda: self.runner.execute(again))
        finally:
            forget(self.runner, out)
            release(self.engine.kv, out)

    def time_varied(self, chunks: list[tuple[int, int]]) -> Timing:
        """ModelRunner.execute on the batch with its last chunk one token longer at each call, as a served engine
        meets a new token count at almost every prefill step. Each such shape's first run is discarded too."""
        times = []
        sched = self.config.scheduler
        total = sum(q for q, _ in chunks)
        for k in range(self.repeats):
            new, cached = chunks[-1]
            grow = new + cached + k + 1 <= sched.max_model_len and total + k + 1 <= sched.max_num_batched_tokens
            varied = chunks[:-1] + [(new + k + 1 if grow else new - k - 1, cached)]
            out = synthetic_batch(varied, self.engine.kv, self.vocab, variant=k + 1)
            try:
                for _ in range(self.warmup):
                    self.runner.execute(out)
                times.append(self.timed(lambda: self.runner.execute(out)))
            finally:
                forget(self.runner, out)
                release(self.engine.kv, out)
        return Timing.of(times)

    def decode(self, bar) -> dict:
        sizes, contexts = decode_grid(self.runner, self.config)
        seconds, spread = [], []
        for b in sizes:
            row = []
            for c in contexts:
                row.append(self.time_batch([(1, c - 1)] * b))
                bar.update(1)
            seconds.append([t.median for t in row])
            spread.append([t.spread for t in row])
        padded = []
        if self.runner.graph_batch_sizes:
            for b in sorted({s for s in sizes if s >= 32} & {32, 128, sizes[-1]}):
                n = b - (b // 4 if b > 32 else 15)
                c = contexts[len(contexts) // 2]
                t = self.time_batch([(1, c - 1)] * n)
                padded.append({"num_seqs": n, "context": c, "seconds": t.median, "spread": t.spread})
                bar.update(1)
        return {"batch_sizes": sizes, "contexts": contexts, "seconds": seconds, "spread": spread, "padded": padded,
                "unit": "seconds of ModelRunner.execute (median); rows: batch sizes, columns: contexts; spread: "
                        "[min, max] of the timed runs"}

    def eager(self, batches, bar) -> dict:
        from pagedlab.sim.profiled_cost import attention_reads
        points, info = [], self.engine_info()
        for chunks in batches:
            repeated, varied = self.time_batch(chunks), self.time_varied(chunks)
            points.append({"num_tokens": sum(q for q, _ in chunks), "num_seqs": len(chunks),
                           "decode_seqs": sum(1 for q, _ in chunks if q == 1),
                           "prefill": [list(c) for c in chunks if c[0] > 1],
                           "attention_reads": attention_reads(chunks, info), "seconds": varied.median,
                           "seconds_spread": varied.spread, "seconds_repeated": repeated.median,
                           "seconds_repeated_spread": repeated.spread})
            bar.update(1)
        return {"points": points}

    def block_moves(self, bar) -> dict:
        num_cpu = len(self.runner.cpu_k_caches[0]) if self.runner.cpu_k_caches else 0
        moves = {"swap_out": [], "swap_in": [], "copy": []}
        for blocks in (1, 8, 64):
            if blocks <= min(num_cpu, self.num_blocks // 2):
                for kind in moves:
                    out = SchedulerOutput(step=0)
                    pairs = [(i, i) for i in range(blocks)] if kind != "copy" else \
                        [(i, self.num_blocks - 1 - i) for i in range(blocks)]
                    setattr(out, {"swap_out": "blocks_to_swap_out", "swap_in": "blocks_to_swap_in",
                                  "copy": "blocks_to_copy"}[kind], pairs)
                    t = self.time_call(lambda: self.runner.execute(out))
                    moves[kind].append({"blocks": blocks, "seconds": t.median, "spread": t.spread})
            bar.update(1)
        moves["block_bytes"] = self.runner.bytes_per_block
        return moves

    def engine_info(self) -> dict:
        from pagedlab.kernels.attention import DOT_MIN_ROWS, prefill_config
        config, runner = self.config, self.runner
        layer = runner.attention_layers[0]
        group = layer.num_heads // layer.num_kv_heads
        return {"dtype": str(runner.dtype).replace("torch.", ""), "device": str(runner.device),
                "block_size": config.cache.block_size, "max_model_len": config.scheduler.max_model_len,
                "max_num_seqs": config.scheduler.max_num_seqs,
                "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
                "enable_chunked_prefill": config.scheduler.enable_chunked_prefill,
                "enforce_eager": config.model.enforce_eager,
                "gpu_memory_utilization": config.cache.gpu_memory_utilization,
                "cuda_graph_batch_sizes": list(runner.graph_batch_sizes), "num_gpu_blocks": self.num_blocks,
                "kv_cache_gib": round(self.num_blocks * runner.bytes_per_block / 2**30, 3),
                "prefill_block_m": prefill_config(runner.device, layer.head_dim)["BLOCK_M"],
                "prefill_group_block": 1 << max(0, (group - 1).bit_length()), "prefill_min_rows": DOT_MIN_ROWS,
                "sampling": "greedy"}

    def host(self, segments: list[tuple[str, int, int, float, int | None]], bar) -> dict:
        """Real runs, one after the other, of (workload, requests, seed, rate, max output tokens): for every step,
        its batch, the runner's time and the host's time around it (from one step's token timestamp to the next,
        less the runner). A step after the engine waited idle for an arrival is left out."""
        from pagedlab.sim.profiled_cost import attention_reads
        from pagedlab.sim.workloads import make_trace, prompt_tokens
        engine = self.engine
        max_len = self.config.scheduler.max_model_len
        steps, current = [], {}
        execute, update = self.runner.execute, engine.scheduler.update

        def timed_execute(out, *grammar):
            start = self.clock()
            results = execute(out, *grammar)
            current["runner"] = self.clock() - start
            current["chunks"] = list(zip(out.num_scheduled_tokens, out.num_computed_tokens))
            return results

        def stamped_update(out, results):
            current["stamp"] = self.clock()
            return update(out, results)

        def record():
            if "stamp" in current:
                steps.append(dict(current))
            current.clear()

        def idle():
            steps.append(None)      # the next step's gap holds the wait

        self.runner.execute, engine.scheduler.update = timed_execute, stamped_update
        # the synchronous step, which is what the simulator models (and what the patches above time)
        overlapped, engine.async_scheduling = engine.async_scheduling, False
        try:
            for workload, count, seed, rate, max_output in segments:
                work = []
                for i, r in enumerate(make_trace(workload, count, seed=seed, request_rate=rate)):
                    prompt = prompt_tokens(r, i + 7 * seed, vocab=min(32000, self.vocab))[:max_len - 1]
                    limit = max(1, min(r.output_len, max_output or r.output_len, max_len - len(prompt)))
                    work.append((prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=limit), r.arrival))
                steps.append(None)
                run_engine(engine, work, on_step=record, on_idle=idle, clock=self.clock)
                bar.update(1)
        finally:
            del self.runner.execute
            engine.scheduler.update = update
            engine.async_scheduling = overlapped
        points, info = [], self.engine_info()
        for before, step in zip(steps, steps[1:]):
            if before is None or step is None:
                continue
            chunks = step["chunks"]
            points.append({"num_seqs": len(chunks), "num_tokens": sum(q for q, _ in chunks),
                           "prefill_tokens": sum(q for q, _ in chunks if q > 1),
                           "attention_reads": attention_reads(chunks, info),
                           "seconds": step["stamp"] - before["stamp"] - step["runner"],
                           "runner_seconds": step["runner"], "chunks": _compress(chunks)})
        return {"points": points, "runs": [dict(workload=w, requests=n, seed=sd, rate=None if math.isinf(r) else r,
                                                max_output=m) for w, n, sd, r, m in segments]}


def _compress(chunks: list[tuple[int, int]]) -> dict:
    """A real step's batch, small: its decode rows as (count, total context), the rest as chunks."""
    decode = [p for q, p in chunks if q == 1]
    return {"decode_seqs": len(decode), "decode_context": sum(decode) + len(decode),
            "decode_max_context": max(decode, default=-1) + 1, "prefill": [[q, p] for q, p in chunks if q != 1]}


def expand(compressed: dict) -> list[tuple[int, int]]:
    """Chunks with the same decode count and total context (evenly spread) as a compressed step."""
    n, total = compressed["decode_seqs"], compressed["decode_context"]
    decode = [(1, total // n - 1 + (i < total % n)) for i in range(n)] if n else []
    return decode + [tuple(c) for c in compressed["prefill"]]


def run_engine(engine, requests, on_step=None, on_idle=None, clock=time.monotonic
               ) -> tuple[list[Request], float, float]:
    """Drive a real engine: requests (prompt ids, params, arrival offset in s) join as the clock passes them; the
    engine steps while it has work and sleeps until the next arrival otherwise. Returns the requests, start, end."""
    engine.report_unfinished = False
    order = sorted(range(len(requests)), key=lambda i: requests[i][2])
    added: list[Request | None] = [None] * len(requests)
    start = clock()
    i = 0
    while i < len(order) or engine.has_unfinished_requests():
        now = clock()
        while i < len(order) and start + requests[order[i]][2] <= now:
            prompt, params, offset = requests[order[i]]
            added[order[i]] = engine.add_request({"prompt_token_ids": prompt}, params, request_id=str(order[i]),
                                                 arrival_time=start + offset)
            i += 1
        if engine.has_unfinished_requests():
            engine.step()
            if on_step is not None:
                on_step()
        elif i < len(order):
            if on_idle is not None:
                on_idle()
            time.sleep(max(0.0, start + requests[order[i]][2] - clock()))
    return added, start, clock()


def card_info(device) -> dict:
    import torch
    if device.type != "cuda":
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        except OSError:
            pass
        return {"name": f"CPU ({cpu})", "short": "cpu", "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    info = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}
    try:
        import pynvml
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception as exc:  # noqa: BLE001 - the driver version is a record, not a requirement
        info["driver"] = f"unknown ({type(exc).__name__})"
    info["short"] = props.name.replace("NVIDIA", "").split()[0].lower()
    return info


def versions() -> dict:
    import torch
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def model_info(runner, name: str | None) -> dict:
    hf = runner.hf_config
    layer = runner.attention_layers[0]
    shape = dict(num_layers=len(runner.attention_layers), hidden_size=hf.hidden_size, num_kv_heads=layer.num_kv_heads,
                 head_dim=layer.head_dim)
    if name is None:        # a known shape by its dimensions, else the checkpoint directory's name
        name = next((n for n, s in MODEL_SHAPES.items() if all(getattr(s, k) == v for k, v in shape.items())),
                    os.path.basename(os.path.normpath(runner.config.model.model)))
    return {"name": name, "num_params": sum(p.numel() for p in runner.model.parameters()), **shape,
            "num_heads": layer.num_heads, "intermediate_size": getattr(hf, "intermediate_size", None),
            "vocab_size": hf.vocab_size, "dtype_bytes": runner.kv_cache_dtype.itemsize,
            "kv_bytes_per_token": runner.bytes_per_block // runner.block_size, "architecture": hf.architectures}


def host_segments(host_requests: int, host_max_output: int, host_rate: float) -> list[tuple]:
    """The real runs that time the host: ShareGPT-like and Alpaca-like offline (big batches, admissions into them),
    then a few requests at a low Poisson rate (small batches); seeds of their own, not the benchmarks' 0."""
    segments = [("sharegpt", host_requests, 1, math.inf, host_max_output),
                ("alpaca", host_requests, 1, math.inf, None)]
    if host_rate > 0:
        segments.append(("sharegpt", max(4, host_requests // 8), 2, host_rate, host_max_output))
    return segments


def profile(engine, *, name: str | None = None, model_name: str | None = None, host_requests: int = 300,
            host_max_output: int = 96, host_rate: float = 10.0, warmup: int = DEFAULT_WARMUP,
            repeats: int = DEFAULT_REPEATS, progress: bool = True,
            command: str | None = None, clock=time.perf_counter) -> dict:
    """Measure `engine` (built with build_engine) and return the profile as a dict. `clock`: the timer (a CPU-time
    clock such as time.process_time keeps other processes on a shared CPU out of a CPU profile)."""
    from tqdm.auto import tqdm

    from pagedlab.sim.profiled_cost import ProfiledCostModel

    from pagedlab.kernels import compile_guard

    started = time.perf_counter()
    profiler = Profiler(engine, warmup, repeats, clock)
    if not compile_guard.COUNTER.startup_complete:      # an engine built without the runner's startup warm-up
        from pagedlab.executor.warmup import warm_up
        warm_up(profiler.runner)
    compiles_before = compile_guard.compiles_after_startup()
    sizes, contexts = decode_grid(profiler.runner, profiler.config)
    batches = eager_grid(profiler.config)
    segments = host_segments(host_requests, host_max_output, host_rate)
    total = len(sizes) * len(contexts) + 3 + len(batches) + 3 + len(segments)
    card = card_info(profiler.runner.device)
    model = model_info(profiler.runner, model_name)
    with tqdm(total=total, desc="profile", disable=not progress) as bar:
        decode = profiler.decode(bar)
        eager = profiler.eager(batches, bar)
        moves = profiler.block_moves(bar)
        host = profiler.host(segments, bar)
    methodology = {"kernel_warmup": "executor/warmup.py at engine startup", "warmup_runs_discarded": warmup,
                   "repeats": repeats, "statistic": "median; spread = [min, max] of the timed runs",
                   "triton_compiles_during_profile": compile_guard.compiles_after_startup() - compiles_before}
    result = {
        "format": FORMAT, "name": name or f"{card.pop('short')}-{model['name']}", "card": card,
        "host_cpu": card_info(profiler.torch.device("cpu"))["name"], "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
        "engine": profiler.engine_info(), "model": model, "methodology": methodology, "decode": decode,
        "eager": eager, "block_moves": moves, "host": host,
    }
    card.pop("short", None)
    result["fit_report"] = ProfiledCostModel(result).fit_report
    result["validation"] = validate(ProfiledCostModel(result, use_run_steps=False), host["points"])
    result["duration_s"] = round(time.perf_counter() - started, 1)
    return result


def validate(cost, points: list[dict]) -> dict:
    """The runner model fitted to the grid alone against the real run's steps (out of sample): decode-only and
    other steps, and all of them together."""
    from pagedlab.sim.profiled_cost import attention_reads, residuals
    rows = {"decode": ([], []), "eager": ([], [])}
    for p in points:
        chunks, c = expand(p["chunks"]), p["chunks"]
        if not c["prefill"]:
            predicted = cost.decode_runner_time(c["decode_seqs"], c["decode_context"])
            kind = "decode"
        else:
            predicted = cost.eager_runner_time(sum(q for q, _ in chunks), attention_reads(chunks, cost.engine),
                                               len(chunks))
            kind = "eager"
        rows[kind][0].append(predicted)
        rows[kind][1].append(p["runner_seconds"])
    report = {kind: residuals(*pair) for kind, pair in rows.items()}
    report["all"] = residuals(rows["decode"][0] + rows["eager"][0], rows["decode"][1] + rows["eager"][1])
    report["note"] = "runner time predicted from the grid alone vs measured on the steps of the real run"
    return report


def save(profile_dict: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(profile_dict, f, indent=1)
        f.write("\n")


def backfill_max_contexts(profile: dict) -> int:
    """Add `decode_max_context` to the real-run steps of a profile written before it was recorded: the offline
    runs are replayed through the same scheduler (their steps do not depend on timing) and matched step by step.
    Returns the number of steps filled; the Poisson run, which depends on timing, is left as it is."""
    from pagedlab.config import EngineConfig
    from pagedlab.engine.llm_engine import LLMEngine
    from pagedlab.sim.cost_model import CostModel
    from pagedlab.sim.simulator import SimExecutor, VirtualClock
    from pagedlab.sim.workloads import make_trace, prompt_tokens

    e = profile["engine"]
    config = EngineConfig.from_kwargs(model="replay", block_size=e["block_size"], max_model_len=e["max_model_len"],
                                      max_num_seqs=e["max_num_seqs"],
                                      max_num_batched_tokens=e["max_num_batched_tokens"])
    vocab, max_len = min(32000, profile["model"]["vocab_size"]), e["max_model_len"]
    shapes = []
    for run in profile["host"]["runs"]:
        if run["rate"] is not None:
            break
        clock = VirtualClock()
        executor = SimExecutor(CostModel(), clock, e["block_size"])
        engine = LLMEngine(config, executor, e["num_gpu_blocks"], 0, clock=clock)
        engine.report_unfinished = False
        for i, r in enumerate(make_trace(run["workload"], run["requests"], seed=run["seed"])):
            prompt = prompt_tokens(r, i + 7 * run["seed"], vocab=vocab)[:max_len - 1]
            limit = max(1, min(r.output_len, run["max_output"] or r.output_len, max_len - len(prompt)))
            engine.add_request({"prompt_token_ids": prompt},
                               SamplingParams(temperature=0, ignore_eos=True, max_tokens=limit))
        run_shapes, execute = [], executor.execute

        def recording(out, *grammar, execute=execute, run_shapes=run_shapes):
            run_shapes.append(_compress(list(zip(out.num_scheduled_tokens, out.num_computed_tokens))))
            return execute(out, *grammar)
        executor.execute = recording
        while engine.has_unfinished_requests():
            engine.step()
        shapes += run_shapes[1:]        # a run's first step is not among the points (no step before it)
    for shape, point in zip(shapes, profile["host"]["points"]):
        chunks = point["chunks"]
        if shape["decode_context"] != chunks["decode_context"] or shape["prefill"] != chunks["prefill"]:
            raise ValueError("the replay does not match the profile's real run")
        point["chunks"]["decode_max_context"] = shape["decode_max_context"]
    return len(shapes)
