"""Scheduler: iteration-level (continuous) batching over a KV allocator.

Every step it builds one batch under two budgets, `max_num_seqs` sequences and `max_num_batched_tokens` tokens:
  1. running requests, in admission order: one token per decoding sequence, or the next chunk of a prompt;
     when blocks run out, the most recently admitted request is preempted (recompute: drop its KV and start
     over later; swap: move its blocks to the CPU pool) until the allocation succeeds;
  2. swapped-out requests come back first, if nothing was preempted this step;
  3. then waiting requests, first come first served, each taking what the prefix cache already holds, while
     1% of the blocks stay free for the running sequences to grow into (vLLM V0's watermark).
`batching="static"` admits (and swaps back in) only into an empty batch and waits until all of it finishes: the
contrast.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

from pagedlab import events as ev
from pagedlab.async_scheduling import InFlightSteps, stops_at_placeholder
from pagedlab.config import SchedulerConfig
from pagedlab.core.interface import KVAllocator
from pagedlab.sched_output import NewSeqData, SampleResult, SchedulerOutput
from pagedlab.scheduled_batch import DecodeRunPlan, ScheduledBatch, ScheduledSeq
from pagedlab.sequence import FinishReason, Request, RequestStatus, Sequence
from pagedlab.stop import check_stop, stops_only_by_length


# Admit a request only if a share of the blocks stays free: admitting into the last free blocks makes the running
# sequences preempt at their next block boundary, and the preempted request is admitted again (recompute thrash).
WATERMARK = 0.01


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVAllocator, bus: ev.EventBus | None = None,
                 eos_token_ids: tuple[int, ...] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.kv = kv
        self.bus = bus or kv.bus
        self.eos_token_ids = set(eos_token_ids)
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.rejected: list[Request] = []
        self.step_id = 0
        self.num_preemptions = 0
        # Sequences that reserved their whole length up front need no room to grow into.
        self.watermark_blocks = int(WATERMARK * kv.num_blocks) if kv.grows_on_demand else 0
        # request -> the length check_stop stops it at, if nothing else can stop it (else None): for decode runs
        self._length_stops: dict[Request, int | None] = {}
        self.batch = ScheduledBatch()           # the last schedule()'s rows as live objects
        # What the worker holds of each sequence it was sent: [tokens, block-table length, last block id, whether it
        # forked since (its last block is shared)]; and what it is still to forget, sent with the next output that
        # has work for it.
        self._held: dict[int, list[int]] = {}
        self.worker_holds_seqs = True           # False (the simulator's executor): send only the per-row columns
        self._finished_seq_ids: list[int] = []
        self._finished_req_ids: list[str] = []
        self._preempted_seq_ids: list[int] = []
        self.in_flight = InFlightSteps()        # async scheduling: launched steps not applied yet

    # --- requests in and out ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        reason = self._never_fits(request)
        if reason:
            self.reject(request, reason)
            return
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def _never_fits(self, request: Request) -> str | None:
        max_len = self.config.max_model_len
        if not request.prompt_token_ids:
            return "the prompt is empty"
        if request.sampling_params.n > self.config.max_num_seqs:
            return (f"n={request.sampling_params.n} samples can never run at once with max_num_seqs="
                    f"{self.config.max_num_seqs}; lower n or raise max_num_seqs")
        if request.num_prompt_tokens > max_len:
            return (f"the prompt has {request.num_prompt_tokens} tokens, more than max_model_len ({max_len}); "
                    f"shorten it by {request.num_prompt_tokens - max_len} tokens or raise max_model_len")
        need, have, n = self.kv.blocks_to_finish(request), self.kv.num_blocks, request.sampling_params.n
        if need > have and n > 1:
            return (f"its n={n} samples of up to {request.max_total_tokens(max_len)} tokens each need {need} KV "
                    f"blocks together and the whole cache has {have}; lower n or max_tokens, or give the KV cache "
                    "more memory")
        if need > have:
            return (f"it needs {need} KV blocks and the whole cache has {have}; "
                    "shorten the prompt or max_tokens, or give the KV cache more memory")
        return None

    def reject(self, request: Request, reason: str) -> None:
        """Finish a request that cannot run, with the reason; it is reported by the next step's output."""
        self._length_stops.pop(request, None)
        request.error = reason
        request.status = RequestStatus.FINISHED
        request.finished_time = self.clock()
        for seq in request.seqs:
            seq.finish_reason = FinishReason.ERROR
        self.rejected.append(request)
        if self.bus.enabled:
            self.bus.emit(ev.REQUEST_REJECTED, request=request, reason=reason)

    def abort(self, request_id: str) -> Request | None:
        """Stop a request wherever it is; every block it held goes back to the pool."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for queue in (self.waiting, self.running, self.swapped):
            if request in queue:
                queue.remove(request)
        for seq in request.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = FinishReason.ABORT
        self._retire(request)
        return request

    def _retire(self, request: Request) -> None:
        self._drop_from_worker(request.seqs, finished=True)
        if request.first_scheduled_time is not None and self.worker_holds_seqs:
            self._finished_req_ids.append(request.request_id)
        self._length_stops.pop(request, None)
        for seq in request.seqs:
            self._free(seq)
        request.status = RequestStatus.FINISHED
        request.finished_time = self.clock()
        if self.bus.enabled:
            reasons = sorted({s.finish_reason.value for s in request.seqs})
            self.bus.emit(ev.REQUEST_FINISHED, request=request, reason=",".join(reasons))

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def num_running_seqs(self) -> int:
        return len([s for r in self.running for s in r.seqs if s.finish_reason is None])

    # --- one step -----------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.step_id += 1
        self.bus.step = self.step_id
        out = SchedulerOutput(step=self.step_id)
        self.batch = ScheduledBatch(rejected=self.rejected)
        self.rejected = []
        budget = [self.config.max_num_batched_tokens, self.config.max_num_seqs]   # tokens, sequences
        batch_was_empty = not self.running

        i = 0
        while i < len(self.running):
            request = self.running[i]
            if self._schedule_running(request, out, budget):
                i += 1

        preempted = self.batch.preempted
        if not preempted and self.swapped and (self.config.batching == "continuous" or batch_was_empty):
            self._swap_in(out, budget)
        if not preempted and not self.swapped and (self.config.batching == "continuous" or batch_was_empty):
            self._admit_waiting(out, budget)
        out.blocks_to_copy = self.kv.take_pending_copies()
        self._describe_batch(out)
        return out

    def _describe_batch(self, out: SchedulerOutput) -> None:
        """The batch as plain data for the worker: a sequence it does not hold whole, one it holds as what was
        appended since (tokens, blocks; an entry copy-on-write replaced), and what it is to forget."""
        held, block_table, block_size = self._held, self.kv.block_table, self.kv.block_size
        scheduled = self.batch.seqs
        out.seq_ids = [s.seq.seq_id for s in scheduled]
        out.num_scheduled_tokens = [s.num_new_tokens for s in scheduled]
        out.num_computed_tokens = [s.start_pos for s in scheduled]
        out.num_samples = [s.num_samples if s.samples else 0 for s in scheduled]
        if not self.worker_holds_seqs:
            return
        cached = out.cached_seqs
        add_cached, add_tokens, add_blocks = (cached.seq_ids.append, cached.new_token_ids.append,
                                              cached.new_block_ids.append)
        for s, seq_id, num_samples in zip(scheduled, out.seq_ids, out.num_samples):
            seq = s.seq
            state = held.get(seq_id)
            if state is None:
                request, table = s.request, block_table(seq)
                params = request.sampling_params
                out.new_seqs.append(NewSeqData(
                    seq_id, request.request_id, s.seq_index, list(seq.token_ids), seq.num_prompt_tokens, table,
                    params, 0 if params.prompt_logprobs is None else max(len(request.prompt_logprobs or ()) - 1, 0)))
                held[seq_id] = [len(seq.token_ids), len(table), table[-1] if table else -1, num_samples > 1]
                continue
            num_tokens, num_blocks, last_block, forked = state
            add_cached(seq_id)
            add_tokens(seq.token_ids[num_tokens:])
            state[0] = len(seq.token_ids)
            if s.start_pos + s.num_new_tokens <= num_blocks * block_size and not forked:
                add_blocks([])      # the blocks it has cover the step and none is shared
                continue
            # Only the block holding the first position computed this step can have been replaced (the ones
            # before it hold computed KV), by copy-on-write after a fork: the last one the worker has.
            table = block_table(seq)
            if num_blocks and table[num_blocks - 1] != last_block:
                out.replaced_block_ids.append((seq_id, num_blocks - 1, table[num_blocks - 1]))
            add_blocks(table[num_blocks:])
            state[1], state[2], state[3] = len(table), table[-1] if table else -1, num_samples > 1
        if out.has_work:
            out.finished_seq_ids, self._finished_seq_ids = self._finished_seq_ids, []
            out.finished_req_ids, self._finished_req_ids = self._finished_req_ids, []
            out.preempted_seq_ids, self._preempted_seq_ids = self._preempted_seq_ids, []

    def _drop_from_worker(self, seqs: list[Sequence], finished: bool) -> None:
        for seq in seqs:
            if self._held.pop(seq.seq_id, None) is not None:
                (self._finished_seq_ids if finished else self._preempted_seq_ids).append(seq.seq_id)

    def _free(self, seq: Sequence) -> None:
        if not self.in_flight.defer_free(seq):
            self.kv.free(seq)

    def _chunk(self, seq: Sequence, budget: list[int]) -> int:
        need = len(seq.token_ids) + seq.num_placeholders - seq.num_computed_tokens
        if need <= budget[0]:
            return need
        return budget[0] if self.config.enable_chunked_prefill else 0

    def _schedule_running(self, request: Request, out: SchedulerOutput, budget: list[int]) -> bool:
        """Schedule the request's sequences, preempting later requests for room. False if it was preempted."""
        for index, seq in enumerate(request.seqs):
            if seq.finish_reason is not None or (
                    seq.num_placeholders and stops_at_placeholder(request, seq, self.config.max_model_len)):
                continue
            num_new = self._chunk(seq, budget)
            if num_new == 0 or budget[1] == 0:
                continue
            while not self.kv.allocate_slots(request, seq, num_new):
                victim = self.running[-1]
                if victim is request and len(self.running) == 1:
                    self._fail_unfittable(request, out, budget)
                    return False
                self._preempt(victim, out, budget)
                if victim is request:
                    return False
            self._add(out, request, seq, index, num_new, budget)
        return True

    def _fail_unfittable(self, request: Request, out: SchedulerOutput, budget: list[int]) -> None:
        """Alone in the batch and still out of blocks: it can never run. Fail it rather than loop forever."""
        self._unschedule(request, out, budget)
        self.running.remove(request)
        self.requests.pop(request.request_id, None)
        self._drop_from_worker(request.seqs, finished=True)
        if self.worker_holds_seqs:
            self._finished_req_ids.append(request.request_id)
        self.kv.drop_pending_copies(request.seqs)
        for seq in request.seqs:
            self.kv.free(seq)
        self.reject(request, f"its sequences need more KV blocks than the whole cache has ({self.kv.num_blocks})")
        self.batch.rejected.append(self.rejected.pop())

    def _add(self, out, request, seq, index, num_new, budget) -> None:
        self.batch.seqs.append(ScheduledSeq(request, seq, index, num_new))
        budget[0] -= num_new
        budget[1] -= 1
        if request.first_scheduled_time is None:
            request.first_scheduled_time = self.clock()

    def _unschedule(self, request: Request, out: SchedulerOutput, budget: list[int]) -> None:
        kept = []
        for s in self.batch.seqs:
            if s.request is request:
                budget[0] += s.num_new_tokens
                budget[1] += 1
            else:
                kept.append(s)
        self.batch.seqs = kept

    def _preempt(self, victim: Request, out: SchedulerOutput, budget: list[int]) -> None:
        if self.in_flight.computes(victim.seqs):
            raise RuntimeError(f"request {victim.request_id} would be preempted while a launched step computes it: "
                               "async scheduling applies that step first (drain_before_scheduling)")
        self._unschedule(victim, out, budget)
        self.running.remove(victim)
        self._drop_from_worker(victim.seqs, finished=False)
        seqs = victim.live_seqs
        aliases = self.kv.drop_pending_copies(seqs)
        swap = self.config.preemption_mode == "swap" and self.kv.can_swap_out(seqs)
        if swap:
            moves = self.kv.swap_out(seqs)
            out.blocks_to_swap_out.extend((aliases.get(gpu, gpu), cpu) for gpu, cpu in moves)
            victim.status = RequestStatus.SWAPPED
            self.swapped.append(victim)
        else:
            self._reset_for_recompute(victim)
            self.waiting.appendleft(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.batch.preempted.append(victim)
        if self.bus.enabled:
            self.bus.emit(ev.REQUEST_PREEMPTED, request=victim, mode="swap" if swap else "recompute")

    def _reset_for_recompute(self, request: Request) -> None:
        for seq in request.seqs:
            self.kv.free(seq)
            seq.num_computed_tokens = 0
        request.status = RequestStatus.WAITING

    def _swap_in(self, out: SchedulerOutput, budget: list[int]) -> None:
        """Bring swapped requests back, oldest first, only when this step's work for them surely fits: a request
        swapped in and out again in one step would have its blocks moved in the wrong order."""
        while self.swapped:
            request = self.swapped[0]
            seqs = request.live_seqs
            if len(seqs) > budget[1]:
                return
            if not self.kv.can_swap_in(seqs, headroom=self._blocks_for_next_step(seqs, budget)):
                if not self.running:        # alone it still does not fit: fall back to recomputing it
                    self.swapped.popleft()
                    self._reset_for_recompute(request)
                    self.waiting.appendleft(request)
                    continue
                return
            self.swapped.popleft()
            out.blocks_to_swap_in.extend(self.kv.swap_in(seqs))
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if self.bus.enabled:
                self.bus.emit(ev.REQUEST_SWAPPED_IN, request=request)
            self._schedule_running(request, out, budget)

    def _blocks_for_next_step(self, seqs: list[Sequence], budget: list[int]) -> int:
        """New blocks the sequences take this step on top of their swapped-out ones (one extra each in case the
        first write lands in a shared block and is copied)."""
        tokens, demand = budget[0], 0
        for seq in seqs:
            chunk = min(seq.num_tokens - seq.num_computed_tokens, tokens)
            tokens -= chunk
            demand += self.kv.blocks_needed_for_growth(seq, chunk)
        return demand

    def _admit_waiting(self, out: SchedulerOutput, budget: list[int]) -> None:
        num_running_seqs = self.num_running_seqs()
        while self.waiting and budget[0] > 0:
            request = self.waiting[0]
            seqs = [(i, s) for i, s in enumerate(request.seqs) if s.finish_reason is None]
            if not self._fits_batch(request, len(seqs), num_running_seqs, budget):
                return
            planned, out_of_blocks = [], False
            for index, seq in seqs:
                prefix = self.kv.find_cached_prefix(request, seq)
                num_new = self._admission_chunk(seq, prefix, budget[0] - sum(n for _, _, n in planned))
                if num_new == 0:
                    break       # out of tokens this step: the rest of its sequences follow in later steps
                if not self.kv.allocate_slots(request, seq, num_new, prefix, keep_free=self._admission_keep_free()):
                    out_of_blocks = True
                    break
                planned.append((index, seq, num_new))
            if out_of_blocks or not planned:
                self.kv.drop_pending_copies([s for _, s, _ in planned])
                for _, seq, _ in planned:       # all or nothing: give back what this request took
                    self.kv.free(seq)
                    seq.num_computed_tokens = 0
                if not out_of_blocks or self.running:
                    return
                # Every block is free and it still does not fit: it never will.
                self.waiting.popleft()
                self.requests.pop(request.request_id, None)
                self.reject(request, "its sequences need more KV blocks than the whole cache has "
                                      f"({self.kv.num_blocks})")
                self.batch.rejected.append(self.rejected.pop())
                continue
            self.waiting.popleft()
            num_running_seqs += self._width(request, len(seqs))
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            for index, seq, num_new in planned:
                self._add(out, request, seq, index, num_new, budget)
            if self.bus.enabled:
                self.bus.emit(ev.REQUEST_ADMITTED, request=request, cached_tokens=request.num_cached_tokens)

    @staticmethod
    def _width(request: Request, num_seqs: int) -> int:
        """Sequences the request runs once forked."""
        return request.sampling_params.n if request.needs_fork else num_seqs

    def _fits_batch(self, request: Request, num_seqs: int, num_running_seqs: int, budget: list[int]) -> bool:
        """Whether the request's live sequences (all n once it forks) fit beside the running ones."""
        return (num_running_seqs + self._width(request, num_seqs) <= self.config.max_num_seqs
                and num_seqs <= budget[1])

    def _admission_chunk(self, seq: Sequence, prefix: list, tokens_left: int) -> int:
        """Tokens of a waiting sequence computed this step after its cached prefix; 0 if none can be (without
        chunked prefill a prompt goes in whole or not at all)."""
        need = seq.num_tokens - seq.num_computed_tokens - len(prefix) * self.kv.block_size
        num_new = min(need, tokens_left)
        return 0 if num_new <= 0 or (num_new < need and not self.config.enable_chunked_prefill) else num_new

    def _admission_keep_free(self) -> int:
        return self.watermark_blocks if self.running else 0

    def _admits_head(self, num_running_seqs: int, budget: list[int], blocks_taken: int) -> bool:
        """Whether admission, after the running sequences took `blocks_taken` blocks and left `budget`, would
        change anything: the first allocation for the head of the waiting queue succeeding."""
        if not self.waiting or budget[0] <= 0 or (self.running and self.config.batching != "continuous"):
            return False
        request = self.waiting[0]
        seqs = request.live_seqs
        if not self._fits_batch(request, len(seqs), num_running_seqs, budget):
            return False
        prefix = self.kv.find_cached_prefix(request, seqs[0])
        num_new = self._admission_chunk(seqs[0], prefix, budget[0])
        return num_new > 0 and self.kv.can_allocate(request, seqs[0], num_new, prefix,
                                                    keep_free=self._admission_keep_free() + blocks_taken)

    # --- decode runs: many regular steps applied at once (the simulator) --------------------------------------
    def plan_decode_run(self, max_steps: int) -> DecodeRunPlan | None:
        """The next steps as a regular decode run, if they are one: every running sequence decodes one token a step
        within both budgets, none forks, only its length can stop it (check_stop), nothing is swapped or rejected,
        admission would take nothing, and the allocator serves each step's blocks. The run ends at the first step
        where a sequence stops. None if the next step is not such a step."""
        # With prefix caching each step registers blocks that the waiting head may find: admission could change.
        if not self.running or self.swapped or self.rejected or self.kv.enable_prefix_caching:
            return None
        requests, seqs, num_computed, remaining = [], [], [], []
        horizon, length_stops = max_steps, self._length_stops
        for request in self.running:
            length_limit = length_stops.get(request, -1)
            if length_limit == -1:
                length_limit = length_stops[request] = self._length_stop(request)
            if length_limit is None or (request.sampling_params.n > 1 and len(request.seqs) == 1):
                return None     # a token may stop it, or it forks when it samples
            for seq in request.seqs:
                if seq.finish_reason is None:
                    computed, num_tokens = seq.num_computed_tokens, len(seq.token_ids)
                    if computed != num_tokens - 1 or computed < seq.num_prompt_tokens:
                        return None     # not decoding
                    left = length_limit - num_tokens
                    if left < horizon:
                        horizon = left
                    remaining.append(left)
                    requests.append(request)
                    seqs.append(seq)
                    num_computed.append(computed)
        n = len(seqs)
        if horizon < 1 or n > self.config.max_num_seqs or n > self.config.max_num_batched_tokens:
            return None
        entered = self.kv.plan_decode_run(seqs, horizon)
        budget = [self.config.max_num_batched_tokens - n, self.config.max_num_seqs - n]
        # Free blocks only shrink during the run, so an admission that fails at its first step fails at every one.
        if not entered or self._admits_head(n, budget, entered[0] if self.kv.grows_on_demand else 0):
            return None
        return DecodeRunPlan(requests, seqs, num_computed, entered, remaining, horizon)

    def _length_stop(self, request: Request) -> int | None:
        if not stops_only_by_length(request.sampling_params, self.eos_token_ids):
            return None
        return request.max_total_tokens(self.config.max_model_len)

    def advance_decode_run(self, plan: DecodeRunPlan, steps: int, sampled: list[int], token_times: list[float]
                           ) -> list[Request]:
        """Apply the first `steps` steps of a planned run, as update() would have step by step: the allocator's
        blocks and computed counts, the tokens (sampled[end]: the one sampled after `end` tokens), their times, the
        stop check; returns the requests retired at its last step."""
        seqs = plan.seqs
        self.kv.advance_decode_run(seqs, steps)
        done, last_time, eos, max_len = [], token_times[-1], self.eos_token_ids, self.config.max_model_len
        for request, seq, computed, remaining in zip(plan.requests, seqs, plan.num_computed_tokens,
                                                     plan.steps_to_length):
            seq.token_ids += sampled[computed + 1:computed + 1 + steps]
            request.token_times += token_times
            request.last_token_time = last_time
            # Only the length can stop it (the plan made sure), and only at the step it reaches it.
            if remaining == steps and check_stop(request, seq, eos, max_len):
                done.append(request)
        self.step_id += steps
        self.bus.step = self.step_id
        return self.retire_finished(dict.fromkeys(done))

    # --- after the executor ran ---------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, results: list[SampleResult | None]) -> list[Request]:
        """Advance sequences by what was computed, append sampled tokens, retire what finished."""
        now = self.clock()
        done = []       # requests with a sequence that finished this step
        caching = self.kv.enable_prefix_caching
        for sched, result in zip(self.batch.seqs, results):
            sched.seq.num_computed_tokens += sched.num_new_tokens
            if caching:
                self.kv.on_computed(sched.request, sched.seq)
            if result is not None:
                self._take_result(sched, result, now, done)
        return self.retire_finished(dict.fromkeys(done))

    def launched(self, batch: ScheduledBatch) -> None:
        """Async scheduling: the batch's step was launched. Its rows count as computed now, and each sampling row
        leaves a placeholder until update_launched brings its token."""
        for s in batch.seqs:
            s.seq.num_computed_tokens += s.num_new_tokens
            if s.samples:
                s.seq.num_placeholders += 1
        self.in_flight.launched(batch)

    def update_launched(self, batch: ScheduledBatch, results: list[SampleResult | None]) -> list[Request]:
        """Async scheduling: the oldest launched step's results. A row whose sequence finished since it was
        scheduled brings a token past its end: dropped. Blocks that waited for this step go back to the pool."""
        now, done = self.clock(), []
        caching = self.kv.enable_prefix_caching
        for sched, result in zip(batch.seqs, results):
            seq = sched.seq
            if sched.samples:
                seq.num_placeholders -= 1
            if seq.finish_reason is not None:
                continue
            if caching:
                self.kv.on_computed(sched.request, seq)
            if result is not None:
                self._take_result(sched, result, now, done)
        finished = self.retire_finished(dict.fromkeys(done))
        for seq in self.in_flight.completed():
            self.kv.free(seq)
        return finished

    def _take_result(self, sched: ScheduledSeq, result: SampleResult, now: float, done: list[Request]) -> None:
        """A row's prompt logprobs and sampled tokens (the children first where it forks), each stop-checked."""
        request, seq = sched.request, sched.seq
        if result.prompt_logprobs is not None:
            request.record_prompt_logprobs(result.prompt_logprobs_start, result.prompt_logprobs)
        if not result.token_ids:
            return
        if sched.num_samples <= 1:
            self._append_token(request, seq, result.token_ids[0], result.logprobs[0] if result.logprobs else None)
            if seq.finish_reason is not None:
                done.append(request)
        else:
            seqs = [seq]
            for _ in range(len(result.token_ids) - 1):
                child = seq.fork()
                self.kv.fork(seq, child)
                request.seqs.append(child)
                seqs.append(child)
            for s, token, lp in zip(seqs, result.token_ids, result.logprobs or [None] * len(seqs)):
                self._append_token(request, s, token, lp)
                if s.finish_reason is not None:
                    done.append(request)
        if request.first_token_time is None:
            request.first_token_time = now
        request.last_token_time = now
        request.token_times.append(now)

    def retire_finished(self, requests) -> list[Request]:
        """Free the blocks of the requests' finished sequences; retire the requests that are done, in order."""
        finished = []
        for request in requests:
            for seq in request.seqs:
                if seq.finish_reason is not None and self.kv.holds(seq):
                    self._drop_from_worker((seq,), finished=True)
                    self._free(seq)
            if request.is_finished and request.status is RequestStatus.RUNNING:
                self.running.remove(request)
                self.requests.pop(request.request_id, None)
                self._retire(request)
                finished.append(request)
        return finished

    def _append_token(self, request: Request, seq: Sequence, token: int, logprobs) -> None:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs.get(token, 0.0)
        check_stop(request, seq, self.eos_token_ids, self.config.max_model_len)
