"""Decode runs: many simulator steps applied at once, with exactly the outcome of stepping one by one.

Between two events (a request arrives, the free blocks run out, a sequence reaches its length) a decode-only batch
is regular: every running sequence gains one token a step, a paged one a new block at each block boundary, nothing
is admitted or preempted, and the cost model gives each step's time from the batch's size and context alone.
`fast_forward` applies such a run in one go, up to and including the step where sequences finish: the same block
ids in the same order, token ids, clock, totals, step stats, timeline rows and finished outputs as
`LLMEngine.step()` would give, at a fraction of the Python work (a ShareGPT-like trace spends most of its steps in
such runs). It applies only to a plain state: nobody listening for step or block-allocation events (a run does not
replay them; request events it publishes as stepping does), no prefix caching, no block shared, nothing swapped,
every running sequence one token behind, and no stop condition but length. tests/test_sim.py checks it against
stepping.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from pagedlab import events as ev
from pagedlab.core.accounting import MemoryUsage
from pagedlab.engine.llm_engine import StepStats
from pagedlab.outputs import RequestOutput
from pagedlab.sequence import FinishReason


# What a run does not publish: its steps' block allocations and step stats. Listeners of request events (the lab's)
# hear them as stepping would publish them: the finishing step retires its requests through the scheduler.
UNREPLAYED = {ev.STEP, ev.BLOCK_ALLOCATED}


@dataclass
class DecodeRun:
    steps: list[tuple[StepStats, MemoryUsage]] = field(default_factory=list)     # each step's stats and memory
    finished: list[RequestOutput] = field(default_factory=list)                 # requests done at the last step


def fast_forward(engine, executor, next_arrival: float, max_steps: int | None) -> DecodeRun | None:
    """Apply the longest regular decode run from here; None, with nothing changed, if the next step is not one."""
    sched, kv = engine.scheduler, engine.kv
    paged = kv.kind == "paged"
    if (engine.bus.wants(UNREPLAYED) or kv.enable_prefix_caching or engine.tokenizer is not None
            or engine.report_unfinished or not sched.running or sched.swapped or sched.rejected or kv.pending_copies
            or (paged and kv.pool.num_extra_refs)):
        return None
    config, bs = sched.config, kv.block_size
    held = kv.tables if paged else kv.regions       # seq_id -> its blocks (paged) or its region (static)
    horizon = config.max_model_len if max_steps is None else max_steps - sched.step_id
    max_len, stops_at_eos = config.max_model_len, bool(sched.eos_token_ids)
    live, first_blocks = [], 0      # live: (request, seq, computed tokens, steps until it finishes)
    for request in sched.running:
        params = request.sampling_params
        if (params.stop_token_ids or params.logprobs is not None or (stops_at_eos and not params.ignore_eos)
                or (params.n > 1 and len(request.seqs) == 1)):     # one sequence yet: it forks when it samples
            return None
        max_tokens = params.max_tokens
        for seq in request.seqs:
            if seq.finish_reason is not None:
                continue
            c, prompt = seq.num_computed_tokens, seq.num_prompt_tokens
            if c != len(seq.token_ids) - 1 or c < prompt:
                return None
            if paged:
                if len(held[seq.seq_id]) != -(-c // bs):
                    return None
            elif held[seq.seq_id][1] * bs - c < horizon:    # a static region ends there: stepping would preempt
                horizon = held[seq.seq_id][1] * bs - c
            steps = max_len - c - 1                         # after which the sequence has finished
            if max_tokens is not None and max_tokens - c - 1 + prompt < steps:
                steps = max_tokens - c - 1 + prompt
            if steps < horizon:                     # the run ends with the first step that finishes a sequence
                horizon = steps
            live.append((request, seq, c, steps))
            if c % bs == 0:                         # its first step writes into a new block
                first_blocks += 1
    n, free = len(live), kv.num_free_blocks
    if (horizon < 1 or n != len(held) or n > config.max_num_seqs or n > config.max_num_batched_tokens
            or (paged and first_blocks > free)
            or (sched.waiting and _could_admit(sched, n, free - first_blocks if paged else free))):
        return None

    # Which sequences enter a new block at each step: sequence s writes position c_s + j - 1 at step j.
    new_blocks: dict[int, list[int]] = {}
    for index, (_, _, c, _) in enumerate(live):
        for j in range(-(-c // bs) * bs - c + 1, horizon + 1, bs):
            new_blocks.setdefault(j, []).append(index)

    # Each step's time; the run stops before a step that would find a request arrived or a block missing.
    computed, longest = sum(c for _, _, c, _ in live), max(c for _, _, c, _ in live)
    now, context, taken, durations, times = engine.clock(), computed, 0, [], []
    for j in range(1, horizon + 1):
        taken += len(new_blocks.get(j, ()))
        if (paged and taken > free) or (j > 1 and next_arrival <= now):
            break
        context += n
        durations.append(executor.cost.decode_time(n, context, longest + j))
        now += durations[-1]
        times.append(now)
    k = len(times)
    if k == 0:
        return None

    # Apply the k steps: blocks in the order stepping takes them, tokens, clock, counters, finished sequences.
    if paged:   # nothing shared, every table ends at its last token: its slots hold tokens or a block's tail
        filled = sum(map(len, held.values())) * bs
        before = MemoryUsage(capacity=kv.num_blocks * bs, tokens=computed, internal=filled - computed, reserved=0,
                             external=0, free=free * bs, cached_free=kv.pool.num_cached_free * bs)
        for j in range(1, k + 1):
            for index in new_blocks.get(j, ()):
                held[live[index][1].seq_id].append(kv.pool.allocate())
    else:
        before = engine.memory_usage()
    finishing = []
    for request, seq, c, steps in live:
        seq.token_ids.extend(executor.tokens(c + 1, c + k))
        seq.num_computed_tokens = c + k
        request.token_times.extend(times)
        request.last_token_time = times[-1]
        if steps == k:
            seq.finish_reason = FinishReason.LENGTH
            finishing.append(request)
    first_step, num_running, num_waiting = sched.step_id + 1, len(sched.running), len(sched.waiting)
    num_blocks = kv.num_blocks
    sched.step_id += k
    engine.bus.step = sched.step_id
    executor.clock.now, executor.last_step_time = times[-1], durations[-1]
    engine.totals["generation_tokens"] += n * k

    # What each step reported. Until sequences finish, the only change in memory is that each step's tokens fill
    # slots: the tail of each sequence's last block (internal), or on entering a new block, a freshly allocated
    # one (paged) or the next reserved one of its region (static).
    taken_by_step = list(itertools.accumulate(len(new_blocks.get(j, ())) for j in range(1, k + 1)))

    def report(j: int, finished: list | None = None) -> tuple[StepStats, MemoryUsage]:
        """Step j's stats and memory; the last step's (finished: the requests it retired) after the retirement."""
        last, taken = finished is not None, taken_by_step[j - 1]
        tokens, filled = before.tokens + n * j, before.tokens + before.internal + taken * bs
        stats = StepStats(
            step=first_step + j - 1, time=times[j - 1], duration=durations[j - 1],
            num_running=len(sched.running) if last else num_running, num_waiting=num_waiting, num_swapped=0,
            num_running_seqs=n - len(finishing) if last else n, num_batched_tokens=n, num_prefill_tokens=0,
            num_decode_seqs=n, num_preempted=0, num_swapped_out_blocks=0, num_swapped_in_blocks=0,
            num_copied_blocks=0, num_finished=len(finished) if last else 0, num_generated_tokens=n,
            kv_blocks_used=num_blocks - (kv.num_free_blocks if last else free - taken * paged),
            kv_blocks_total=num_blocks)
        usage = engine.memory_usage() if last and finishing else MemoryUsage(
            capacity=before.capacity, tokens=tokens, internal=filled - tokens,
            reserved=before.reserved - (0 if paged else taken * bs), external=before.external,
            free=before.free - (taken * bs if paged else 0), cached_free=before.cached_free, shared_saved=0)
        return stats, usage

    run = DecodeRun(steps=[report(j) for j in range(1, k)])
    if run.steps:       # what the engine last reported when the finishing step retires its requests
        engine.last_step = run.steps[-1][0]
    finished = sched.retire_finished(dict.fromkeys(finishing))
    engine.totals["finished"] += len(finished)
    run.steps.append(report(k, finished))
    engine.last_step = run.steps[-1][0]
    run.finished = [engine.output_processor.make_output(request) for request in finished]
    return run


def _could_admit(sched, num_running_seqs: int, free: int) -> bool:
    """Whether this step's admission would touch the allocator for the head of the waiting queue, with `free` blocks
    left after the decodes: its first sequence's allocation succeeding (the scheduler's _admit_waiting without a
    prefix cache). If not, it will not before a request finishes: until then free blocks only shrink, and budgets
    and a static arena's holes stay the same."""
    config, kv = sched.config, sched.kv
    if config.batching != "continuous":        # static batching admits only into an empty batch
        return False
    request = sched.waiting[0]
    seqs = request.live_seqs
    width = request.sampling_params.n if request.needs_fork else len(seqs)
    tokens = config.max_num_batched_tokens - num_running_seqs
    if tokens <= 0 or num_running_seqs + max(width, len(seqs)) > config.max_num_seqs:
        return False
    seq = seqs[0]
    need = seq.num_tokens - seq.num_computed_tokens
    num_new = min(need, tokens)
    if num_new <= 0 or (num_new < need and not config.enable_chunked_prefill):
        return False
    if kv.kind == "paged":
        demand = kv.blocks_needed(seq.num_computed_tokens + num_new) - len(kv.tables.get(seq.seq_id, ()))
        return free - demand >= sched.watermark_blocks
    holes, length = list(kv.holes), kv.region_blocks(request)     # first fit, as StaticAllocator.allocate_slots
    copies = request.sampling_params.n if request.needs_fork else 1
    return all(kv._first_fit(holes, length) is not None for _ in range(copies))
