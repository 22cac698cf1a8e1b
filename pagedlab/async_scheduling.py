"""Async scheduling, the scheduler's side (vLLM V1's AsyncScheduler): step N+1 is scheduled while step N runs.

When a step is launched its rows count as computed at once and each row that samples leaves a placeholder
(`Sequence.num_placeholders`): the next schedule sees the sequence one token longer, so it gives it a decode row
and sizes its blocks exactly, and the worker reads that row's input id off the device (the token step N sampled
there). When step N's tokens come back they replace the placeholders. A sequence that step N finished (EOS, a stop
token or string, an abort) was already scheduled in step N+1: that row's token is dropped, and the sequence's blocks
go back to the pool only once step N+1 has completed (`InFlightSteps`), so no block is reused while a launched step
may still write it. A sequence whose placeholder is surely its last token (its length limit) is not scheduled again.

Some steps do not overlap (`collect_at_once`, `drain_before_scheduling`):
- a step that forks n > 1 samples (the children exist only once its tokens are back) or one with a structured-output
  row (the grammar must accept the token before the next bitmask is filled): its tokens are collected before the
  next step is scheduled;
- (not a fallback) a sampling row that reads its past tokens (penalties, min_tokens, bad_words) gets the previous
  step's token from that step's host copy: the runner waits for that step alone, once this step's forward pass is
  launched;
- when the running sequences' next step might not find the blocks it needs (a preemption, and with it a swap-out
  or a recompute, could follow), the step in flight is collected first: preemption is decided with nothing in
  flight, so swaps and copy-on-write keep the order of the synchronous engine.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from pagedlab.sequence import Request, Sequence

if TYPE_CHECKING:
    from pagedlab.scheduled_batch import ScheduledBatch
    from pagedlab.scheduler import Scheduler


class InFlightSteps:
    """The launched steps whose tokens have not been applied, oldest first: their sequences, and the sequences
    that finished while a step that still writes them was in flight (freed when it completes)."""

    def __init__(self) -> None:
        self._steps: deque[tuple[set[int], list[Sequence]]] = deque()

    def __len__(self) -> int:
        return len(self._steps)

    def launched(self, batch: ScheduledBatch) -> None:
        self._steps.append(({s.seq.seq_id for s in batch.seqs}, []))

    def defer_free(self, seq: Sequence) -> bool:
        """True if a step in flight still computes `seq`: its blocks are freed when the newest such step
        completes."""
        for seq_ids, deferred in reversed(self._steps):
            if seq.seq_id in seq_ids:
                deferred.append(seq)
                return True
        return False

    def computes(self, seqs: list[Sequence]) -> bool:
        """Whether a step in flight computes any of `seqs`."""
        return any(seq.seq_id in seq_ids for seq_ids, _ in self._steps for seq in seqs)

    def completed(self) -> list[Sequence]:
        """The oldest step completed: the sequences whose blocks waited for it."""
        return self._steps.popleft()[1] if self._steps else []


def stops_at_placeholder(request: Request, seq: Sequence, max_model_len: int) -> bool:
    """Whether the token still in flight surely ends the sequence (its length limit): nothing to schedule."""
    return len(seq.token_ids) + seq.num_placeholders >= request.max_total_tokens(max_model_len)


def collect_at_once(batch: ScheduledBatch) -> str | None:
    """Why this step's tokens must be back before the next step is scheduled, or None if it can overlap."""
    for s in batch.seqs:
        if s.samples:
            if s.num_samples > 1:
                return "fork"
            if s.request.grammar is not None:
                return "structured output"
    return None


def drain_before_scheduling(scheduler: Scheduler) -> bool:
    """Whether the next step's running sequences might not all get their blocks from the free pool (so it might
    preempt): counted generously, one more block for each sequence of an n > 1 request (copy-on-write)."""
    kv = scheduler.kv
    if not kv.grows_on_demand:
        return False
    budget, free = scheduler.config.max_num_batched_tokens, kv.num_free_blocks
    # The step's tokens fill at most budget / block_size new blocks, each sequence adds at most one partial block
    # and one copy-on-write: with that many free (a GPU's usual case) nothing is counted.
    if free >= budget // kv.block_size + 3 * sum(len(r.seqs) for r in scheduler.running):
        return False
    need = 0
    for request in scheduler.running:
        cow = request.sampling_params.n > 1
        for seq in request.seqs:
            if seq.finish_reason is None:
                chunk = min(len(seq.token_ids) + seq.num_placeholders - seq.num_computed_tokens, budget)
                # blocks_needed_for_growth counts a copy-on-write block for every sequence
                need += kv.blocks_needed_for_growth(seq, chunk) - 1 + cow
                if need > free:
                    return True
    return False
