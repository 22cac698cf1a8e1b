"""LLMEngine: the step loop — schedule, execute, update, report — over any executor.

The same engine drives the real model runner and the simulator; only the executor and the clock differ.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, TypeVar

from pagedlab import events as ev
from pagedlab.async_scheduling import collect_at_once, drain_before_scheduling
from pagedlab.config import ConfigError, EngineConfig
from pagedlab.core.interface import KVAllocator
from pagedlab.core.kv_cache_manager import KVCacheManager
from pagedlab.core.static_allocator import StaticAllocator
from pagedlab.engine.output_processor import OutputProcessor
from pagedlab.executor.base import Executor, check_kv_capacity, format_bytes  # noqa: F401 - importable here
from pagedlab.outputs import RequestOutput
from pagedlab.sampling_params import SamplingParams
from pagedlab.sched_output import SchedulerOutput
from pagedlab.scheduled_batch import ScheduledBatch
from pagedlab.scheduler import Scheduler
from pagedlab.sequence import FinishReason, Request, RequestStatus
from pagedlab.structured_outputs import RequestGrammar, StructuredOutputManager, accept_tokens, fill_bitmask

T = TypeVar("T")


@dataclass
class StepStats:
    step: int
    time: float                  # engine clock at the end of the step
    duration: float              # seconds the executor took (or the cost model's estimate)
    num_running: int
    num_waiting: int
    num_swapped: int
    num_running_seqs: int
    num_batched_tokens: int
    num_prefill_tokens: int
    num_decode_seqs: int
    num_preempted: int
    num_swapped_out_blocks: int
    num_swapped_in_blocks: int
    num_copied_blocks: int
    num_finished: int
    num_generated_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    # Host seconds (perf_counter) of the step's phases, not part of a step's identity. The executor's split is its
    # own report (ModelRunner's last_phase_times); on a GPU `forward` is the launch, `sample` waits for the device.
    schedule_time: float = field(default=0.0, compare=False)
    prepare_time: float = field(default=0.0, compare=False)
    forward_time: float = field(default=0.0, compare=False)
    sample_time: float = field(default=0.0, compare=False)
    update_time: float = field(default=0.0, compare=False)
    HOST_TIMES: ClassVar[tuple[str, ...]] = ("schedule_time", "prepare_time", "forward_time", "sample_time",
                                             "update_time")

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def _batch_shape(batch: ScheduledBatch) -> tuple[int, int, int]:
    """(prefill tokens, decoding sequences, sampled tokens) of a scheduled batch, before it is applied."""
    prefill = decode_seqs = sampled = 0
    for s in batch.seqs:
        if s.num_new_tokens == 1 and s.start_pos >= s.seq.num_prompt_tokens:
            decode_seqs += 1
        else:
            prefill += s.num_new_tokens
        if s.samples:
            sampled += s.num_samples
    return prefill, decode_seqs, sampled


@dataclass
class LaunchedStep:
    """A step launched under async scheduling, its tokens not applied yet."""
    out: SchedulerOutput
    batch: ScheduledBatch
    pending: object                 # the executor's handle: ModelRunner.launch's AsyncOutput
    started: float                  # engine clock at the launch
    schedule_time: float
    launch_times: tuple[float, float, float]      # host seconds: prepare, forward launch, sampling launch
    has_grammar: bool


def resolve_async_scheduling(config: EngineConfig, executor: Executor) -> bool:
    """SchedulerConfig.async_scheduling, None resolved: on for a CUDA model runner that supports it."""
    wanted = config.scheduler.async_scheduling
    supported = getattr(executor, "supports_async_scheduling", False)
    if wanted is None:
        device = getattr(executor, "device", None)
        return bool(supported and device is not None and device.type == "cuda")
    if wanted and not supported:
        raise ConfigError(f"async_scheduling=True needs an executor that launches a step without waiting for its "
                          f"tokens (the model runner, tensor_parallel_size 1); {type(executor).__name__} steps "
                          "synchronously. Pass async_scheduling=False")
    return wanted


def make_allocator(config: EngineConfig, num_blocks: int, num_cpu_blocks: int, bus: ev.EventBus) -> KVAllocator:
    cache, max_model_len = config.cache, config.scheduler.max_model_len
    if cache.allocator == "static":
        return StaticAllocator(num_blocks, cache.block_size, max_model_len, cache.static_reservation, bus)
    return KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching, num_cpu_blocks, bus,
                          max_model_len)


NO_TOKENIZER = "this engine has no tokenizer: pass {'prompt_token_ids': [...]} instead of text"


def parse_prompt(prompt) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of a prompt given as text, token ids, {"prompt": text} or {"prompt_token_ids": ids}; the
    ids are None when the text is still to be tokenized."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        return prompt, None
    return None, list(prompt)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor, num_gpu_blocks: int, num_cpu_blocks: int = 0,
                 tokenizer=None, eos_token_ids: tuple[int, ...] = (), clock: Callable[[], float] = time.monotonic,
                 bytes_per_block: int | None = None, vocab_size: int | None = None) -> None:
        check_kv_capacity(num_gpu_blocks, config.cache.block_size, config.scheduler.max_model_len, bytes_per_block)
        self.config = config
        self.executor = executor
        self.clock = clock
        self.bus = ev.EventBus()
        self.kv = make_allocator(config, num_gpu_blocks, num_cpu_blocks, self.bus)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.bus, eos_token_ids, clock)
        self.scheduler.worker_holds_seqs = getattr(executor, "holds_seqs", True)
        self.output_processor = OutputProcessor(self.scheduler, tokenizer)
        self.bytes_per_block = bytes_per_block
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._structured: StructuredOutputManager | None = None
        self._compiling: dict[str, tuple[Request, concurrent.futures.Future]] = {}   # waiting for their grammar
        self._ids = itertools.count()
        self.last_step: StepStats | None = None
        self.report_unfinished = True              # False: step() reports only finished requests (faster)
        self.totals = {"prompt_tokens": 0, "generation_tokens": 0, "preemptions": 0, "finished": 0}
        # Async scheduling (async_scheduling.py): step N+1 is scheduled and launched before step N's tokens are
        # applied. Switch it only between steps with nothing in flight.
        self.async_scheduling = resolve_async_scheduling(config, executor)
        self._in_flight: LaunchedStep | None = None
        # steps whose tokens were collected before the next was scheduled, by reason (async_scheduling.py)
        self.sync_steps: dict[str, int] = {}
        self.discarded_tokens = 0       # sampled past the end of a sequence that a step before had finished

    @property
    def tokenizer(self):
        return self.output_processor.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self.output_processor.tokenizer = tokenizer

    # --- requests -----------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    cache_salt: str | None = None, stream: bool = False) -> Request:
        params = params or SamplingParams()
        text, token_ids = self._tokenize(prompt)
        request = Request(request_id or str(next(self._ids)), token_ids, params, prompt=text,
                          arrival_time=self.clock() if arrival_time is None else arrival_time,
                          cache_salt=cache_salt, stream=stream)
        problem = self._invalid_token_ids(request) or self._prepare_constraints(params)
        if problem:
            self.scheduler.reject(request, problem)
        elif params.structured_outputs is not None:
            if request.request_id in self._compiling or request.request_id in self.scheduler.requests:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            self._compiling[request.request_id] = (request, self.structured.submit(params.structured_outputs))
        else:
            self.scheduler.add_request(request)
        return request

    @property
    def structured(self) -> StructuredOutputManager:
        if self._structured is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer, and this engine has none")
            self._structured = StructuredOutputManager(self.tokenizer, self.vocab_size or len(self.tokenizer),
                                                       self.eos_token_ids)
        return self._structured

    def _prepare_constraints(self, params: SamplingParams) -> str | None:
        """bad_words become token-id sequences (each word as written and after a space, as vLLM does)."""
        if params.bad_words and params.bad_words_token_ids is None:
            if self.tokenizer is None:
                return "bad_words need a tokenizer, and this engine has none"
            variants = {v for w in params.bad_words for v in (w, w if w.startswith(" ") else " " + w)}
            params.bad_words_token_ids = [ids for ids in (self.tokenizer.encode(v, add_special_tokens=False)
                                                          for v in sorted(variants)) if ids]
        if params.structured_outputs is not None and self.tokenizer is None:
            return "structured outputs need a tokenizer, and this engine has none"
        if params.stop_strings and self.tokenizer is None:
            return "stop strings need a tokenizer, and this engine has none; use stop_token_ids"
        return None

    def _admit_compiled(self) -> None:
        """Requests whose grammar is ready join the scheduler; a failed compile rejects its request."""
        if not self._compiling:
            return
        if self.scheduler.has_unfinished or self.scheduler.rejected:
            ready = [entry for entry in self._compiling.values() if entry[1].done()]
        else:       # nothing else to do: wait a little for a compile instead of spinning
            done, _ = concurrent.futures.wait([f for _, f in self._compiling.values()], timeout=0.05,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            ready = [entry for entry in self._compiling.values() if entry[1] in done]
        for request, future in ready:
            del self._compiling[request.request_id]
            try:
                request.grammar = RequestGrammar(future.result(), request.sampling_params.n)
            except Exception as exc:  # noqa: BLE001 - the request's error, not the engine's
                self.scheduler.reject(request, str(exc))
                continue
            self.scheduler.add_request(request)

    def _invalid_token_ids(self, request: Request) -> str | None:
        if self.vocab_size is None:
            return None
        params = request.sampling_params
        for name, ids in (("prompt", request.prompt_token_ids), ("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", list(params.logit_bias or ())),
                          ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                return f"{name} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
        return None

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        text, ids = parse_prompt(prompt)
        if ids is not None:
            return text, ids
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        return text, self.tokenizer.encode(text)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        if request_id in self._compiling:
            request, future = self._compiling.pop(request_id)
            future.cancel()
            for seq in request.seqs:
                seq.finish_reason = FinishReason.ABORT
            request.status = RequestStatus.FINISHED
            return self.output_processor.make_output(request)
        request = self.scheduler.abort(request_id)
        return None if request is None else self.output_processor.make_output(request)

    def stop_sequences(self, request_id: str, stop_reasons: dict[int, str]) -> bool:
        """Finish sequences (by index) that a stop string ended where the text is decoded (the API server's front
        end), freeing their blocks; True if that finished the request."""
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return False
        for index, stop in stop_reasons.items():
            if index < len(request.seqs) and request.seqs[index].finish_reason is None:
                request.seqs[index].finish_reason, request.seqs[index].stop_reason = FinishReason.STOP, stop
        if not request.is_finished:
            self.scheduler.retire_finished([request])
            return False
        self.scheduler.abort(request_id)      # running, waiting or swapped: every block goes back
        self.totals["finished"] += 1
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._compiling) or self._in_flight is not None

    # --- the step -----------------------------------------------------------------------------------------
    def step(self, make_output: Callable[[Request], T] | None = None) -> list[RequestOutput | T]:
        """One iteration; returns an output for every request that got tokens, finished or was rejected.
        make_output(request) builds them instead of RequestOutputs (the engine core sends token-id deltas)."""
        make_output = make_output or self.output_processor.make_output
        if self.async_scheduling or self._in_flight is not None:
            return self._step_async(make_output)
        self._admit_compiled()
        scheduling = time.perf_counter()
        out = self.scheduler.schedule()         # plain data, for the executor
        batch = self.scheduler.batch            # the same step as live requests and sequences
        started, executing = self.clock(), time.perf_counter()
        results, failed, phases = [], [], None
        if out.has_work:
            try:
                grammar = self._grammar(batch)
                results = self.executor.execute(out, *grammar)
                phases = getattr(self.executor, "last_phase_times", None)
                if grammar:
                    accept_tokens(batch.seqs, results)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not take the engine down
                failed = self._fail_batch(batch, exc)
                batch.seqs = []
        duration = getattr(self.executor, "last_step_time", None) or (self.clock() - started)
        work = _batch_shape(batch)
        updating = time.perf_counter()
        finished = self.scheduler.update(out, results) if batch.seqs else []
        sampled = list(dict.fromkeys([s.request for s in batch.seqs if s.samples]))
        finished += self.output_processor.process(sampled)      # stop strings: their blocks are freed now
        times = (executing - scheduling, *(phases or (0.0, updating - executing, 0.0)),
                 time.perf_counter() - updating)
        self._record_step(out, batch, work, finished, duration, times)
        return self._outputs(batch, failed, sampled, make_output)

    def _outputs(self, batch: ScheduledBatch, failed: list[Request], sampled: list[Request],
                 make_output: Callable[[Request], T]) -> list[RequestOutput | T]:
        outputs = [make_output(r) for r in batch.rejected + failed]
        seen = {r.request_id for r in batch.rejected + failed}
        outputs += [make_output(r) for r in sampled if (self.report_unfinished or r.status is RequestStatus.FINISHED)
                    and r.request_id not in seen]
        return outputs

    # --- async scheduling: launch step N+1, then apply step N ---------------------------------------------
    def _step_async(self, make_output: Callable[[Request], T]) -> list[RequestOutput | T]:
        """Schedule the next step while the one in flight runs, launch it, then apply the one in flight and
        return its outputs. A step collect_at_once names is applied before the next is scheduled; so is the one in
        flight when the next might preempt (drain_before_scheduling)."""
        outputs, previous, self._in_flight = [], self._in_flight, None
        if previous is not None and (not self.async_scheduling or drain_before_scheduling(self.scheduler)):
            self._count_sync("blocks" if self.async_scheduling else "switched off")
            outputs += self._apply_launched(previous, make_output)
            previous = None
        if not self.async_scheduling:
            return outputs
        self._admit_compiled()
        scheduling = time.perf_counter()
        out = self.scheduler.schedule()
        batch = self.scheduler.batch
        launched, failed = None, []
        if out.has_work:
            started, launching = self.clock(), time.perf_counter()
            grammar = self._grammar(batch)
            try:
                pending = self.executor.launch(out, *grammar)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not take the engine down
                failed = self._fail_batch(batch, exc)
                batch.seqs = []
            else:
                self.scheduler.launched(batch)
                launch_times = getattr(self.executor, "last_phase_times", (0.0, time.perf_counter() - launching, 0.0))
                launched = LaunchedStep(out, batch, pending, started, launching - scheduling, launch_times,
                                        bool(grammar))
        if previous is not None:
            outputs += self._apply_launched(previous, make_output)
        if launched is None:        # nothing to compute: the step ends here
            self._record_step(out, batch, (0, 0, 0), [], 0.0, (time.perf_counter() - scheduling, 0, 0, 0, 0))
            return outputs + self._outputs(batch, failed, [], make_output)
        reason = collect_at_once(batch)
        if reason is not None:
            self._count_sync(reason)
            return outputs + self._apply_launched(launched, make_output)
        self._in_flight = launched
        return outputs

    def _count_sync(self, reason: str) -> None:
        self.sync_steps[reason] = self.sync_steps.get(reason, 0) + 1

    def _apply_launched(self, step: LaunchedStep, make_output: Callable[[Request], T]) -> list[RequestOutput | T]:
        """Wait for a launched step's tokens and apply them: update, the output stage, its StepStats."""
        batch, failed = step.batch, []
        # the rows whose tokens count: those of sequences still going (a finished one's token is past its end)
        live = [s for s in batch.seqs if s.seq.finish_reason is None]
        self.discarded_tokens += sum(1 for s in batch.seqs if s.samples and s.seq.finish_reason is not None)
        collecting = time.perf_counter()
        try:
            results = self.executor.collect(step.pending)
            if step.has_grammar:
                accept_tokens(live, [r for s, r in zip(batch.seqs, results) if s.seq.finish_reason is None])
        except Exception as exc:  # noqa: BLE001 - one bad batch must not take the engine down
            failed = self._fail_batch(batch, exc)
            results = [None] * len(batch.seqs)
        updating = time.perf_counter()
        duration = self.clock() - step.started
        prefill, decode_seqs, _ = _batch_shape(batch)
        generated = sum(s.num_samples for s in live if s.samples) if not failed else 0
        finished = self.scheduler.update_launched(batch, results)
        sampled = list(dict.fromkeys(s.request for s in live if s.samples)) if not failed else []
        finished += self.output_processor.process(sampled)
        prepare, forward, sample = step.launch_times
        times = (step.schedule_time, prepare, forward, sample + updating - collecting, time.perf_counter() - updating)
        self._record_step(step.out, batch, (prefill, decode_seqs, generated), finished, duration, times)
        return self._outputs(batch, failed, sampled, make_output)

    def _grammar(self, batch: ScheduledBatch) -> tuple:
        """The executor's grammar argument: the bitmask of the step's structured-output rows, filled on request
        (while the device runs the forward pass); nothing when no row has a grammar."""
        if self._structured is None:
            return ()
        sampling = [s for s in batch.seqs if s.samples]
        if not any(s.request.grammar is not None for s in sampling):
            return ()
        return (lambda vocab_size: fill_bitmask(sampling, vocab_size),)

    def _fail_batch(self, batch: ScheduledBatch, exc: Exception) -> list[Request]:
        failed = []
        for request in dict.fromkeys(s.request for s in batch.seqs):
            request.error = f"{type(exc).__name__}: {exc}"
            for seq in request.seqs:
                seq.finish_reason = seq.finish_reason or FinishReason.ERROR
            if self.scheduler.abort(request.request_id) is not None:
                failed.append(request)
        return failed

    def _record_step(self, out, batch: ScheduledBatch, work: tuple[int, int, int], finished: list[Request],
                     duration: float, times: tuple[float, float, float, float, float]) -> None:
        prefill, decode_seqs, generated = work
        sched = self.scheduler
        used = self.kv.num_blocks - self.kv.num_free_blocks
        self.last_step = StepStats(
            step=out.step, time=self.clock(), duration=duration, num_running=len(sched.running),
            num_waiting=len(sched.waiting), num_swapped=len(sched.swapped),
            num_running_seqs=sched.num_running_seqs(), num_batched_tokens=out.num_batched_tokens,
            num_prefill_tokens=prefill, num_decode_seqs=decode_seqs,
            num_preempted=len(batch.preempted), num_swapped_out_blocks=len(out.blocks_to_swap_out),
            num_swapped_in_blocks=len(out.blocks_to_swap_in), num_copied_blocks=len(out.blocks_to_copy),
            num_finished=len(finished), num_generated_tokens=generated, kv_blocks_used=used,
            kv_blocks_total=self.kv.num_blocks, schedule_time=times[0], prepare_time=times[1],
            forward_time=times[2], sample_time=times[3], update_time=times[4])
        self._count(self.last_step)
        if self.bus.enabled:
            self.bus.emit(ev.STEP, stats=self.last_step)

    def _count(self, stats: StepStats) -> None:
        self.totals["prompt_tokens"] += stats.num_prefill_tokens
        self.totals["generation_tokens"] += stats.num_generated_tokens
        self.totals["preemptions"] += stats.num_preempted
        self.totals["finished"] += stats.num_finished

    def record_steps(self, steps: list[StepStats], finished: list[Request]) -> list[RequestOutput]:
        """Account for steps the scheduler applied without step() (the simulator's decode runs, applied only while
        nobody listens for step events): totals, last_step, and the outputs of the requests they finished."""
        for stats in steps:
            self._count(stats)
        self.last_step = steps[-1]
        return [self.output_processor.make_output(request) for request in finished]

    # --- introspection ------------------------------------------------------------------------------------
    def memory_usage(self):
        waiting = self.scheduler.waiting
        next_tokens = waiting[0].max_total_tokens(self.config.scheduler.max_model_len) if waiting else None
        return self.kv.usage(next_tokens)

    def snapshot(self):
        from pagedlab.core.snapshot import take_snapshot
        return take_snapshot(self)

    def shutdown(self) -> None:
        """Stop the executor: tensor-parallel workers exit and the process group goes; CUDA graphs are released."""
        stop = getattr(self.executor, "shutdown", None) or getattr(self.executor, "release_cuda_graphs", None)
        if stop is not None:
            stop()
