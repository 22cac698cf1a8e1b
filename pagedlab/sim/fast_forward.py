"""Decode runs: many simulator steps applied at once, with exactly the outcome of stepping one by one.

Between two events (a request arrives, the free blocks run out, a sequence reaches its length) a decode-only batch
is regular: every running sequence gains one token a step, a paged one a new block at each block boundary, nothing
is admitted or preempted, and the cost model gives each step's time from the batch's size and context alone.
`fast_forward` applies such a run in one go, up to and including the step where sequences finish: the same block
ids in the same order, token ids, clock, totals, step stats, timeline rows and finished outputs as
`LLMEngine.step()` would give, at a fraction of the Python work (a ShareGPT-like trace spends most of its steps in
such runs).

Every rule comes from its owner: the scheduler says whether the next steps are a run (its own admission and stop
predicates, `Scheduler.plan_decode_run`) and applies it (`advance_decode_run`, ending with `check_stop`); the
allocator says which blocks each step enters and how the accounting moves (`KVAllocator.plan_decode_run`,
`usage_after_decode`); the executor prices the steps (`SimExecutor.execute_decode_run`); the engine counts them
(`LLMEngine.record_steps`). What is left here is the order of those calls and the step stats a decode step reports.
A run replays no step or block-allocation events, so it stands aside while anyone listens for those (request events
it publishes as stepping does), and while the engine detokenizes or reports unfinished requests.
tests/test_sim.py checks it against stepping.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedlab import events as ev
from pagedlab.core.accounting import MemoryUsage
from pagedlab.engine.llm_engine import StepStats
from pagedlab.outputs import RequestOutput


UNREPLAYED = {ev.STEP, ev.BLOCK_ALLOCATED}


@dataclass
class DecodeRun:
    steps: list[tuple[StepStats, MemoryUsage]] = field(default_factory=list)     # each step's stats and memory
    finished: list[RequestOutput] = field(default_factory=list)                 # requests done at the last step
    blocks_run_out: bool = False    # the next step needs more free blocks than there are: it is not a run


def fast_forward(engine, executor, next_arrival: float, max_steps: int | None, usage: MemoryUsage | None = None
                 ) -> DecodeRun | None:
    """Apply the longest regular decode run from here; None, with nothing changed, if the next step is not one.
    `usage`: engine.memory_usage() as it is now, if the caller has it (it is taken otherwise)."""
    sched, kv = engine.scheduler, engine.kv
    if engine.bus.wants(UNREPLAYED) or engine.tokenizer is not None or engine.report_unfinished:
        return None
    plan = sched.plan_decode_run(sched.config.max_model_len if max_steps is None else max_steps - sched.step_id)
    if plan is None:
        return None
    computed = plan.num_computed_tokens
    n = len(computed)
    durations, times = executor.execute_decode_run(n, sum(computed), max(computed), len(plan.blocks_entered),
                                                   next_arrival)
    k = len(durations)

    before = usage if usage is not None else engine.memory_usage()
    first_step, num_running, num_waiting = sched.step_id + 1, len(sched.running), len(sched.waiting)
    finished = sched.advance_decode_run(plan, k, executor.token_table(max(computed) + k), times)
    bs, num_blocks, running_seqs = kv.block_size, kv.num_blocks, sched.num_running_seqs()

    def step(j: int, usage: MemoryUsage, last: bool) -> tuple[StepStats, MemoryUsage]:
        """Step j of the run: a decode of all n sequences; the last one reports after its retirements."""
        stats = StepStats(
            step=first_step + j - 1, time=times[j - 1], duration=durations[j - 1],
            num_running=len(sched.running) if last else num_running, num_waiting=num_waiting, num_swapped=0,
            num_running_seqs=running_seqs if last else n, num_batched_tokens=n, num_prefill_tokens=0,
            num_decode_seqs=n, num_preempted=0, num_swapped_out_blocks=0, num_swapped_in_blocks=0,
            num_copied_blocks=0, num_finished=len(finished) if last else 0, num_generated_tokens=n,
            kv_blocks_used=num_blocks - (kv.num_free_blocks if last else usage.unallocated // bs),
            kv_blocks_total=num_blocks)
        return stats, usage

    entered = plan.blocks_entered
    steps = [step(j, kv.usage_after_decode(before, n * j, entered[j - 1]), False) for j in range(1, k)]
    last = engine.memory_usage() if running_seqs < n else kv.usage_after_decode(before, n * k, entered[k - 1])
    steps.append(step(k, last, True))
    outputs = engine.record_steps([stats for stats, _ in steps], finished)
    return DecodeRun(steps, outputs, plan.blocks_run_out_after(k))
