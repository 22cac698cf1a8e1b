"""The scheduler's own view of a step, as live objects (the executor gets plain data, pagedlab/sched_output.py):
the scheduled sequences and the requests preempted or rejected, and the plan of a decode run (the simulator's
fast path, Scheduler.plan_decode_run)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedlab.sequence import Request, Sequence


class ScheduledSeq:
    """The scheduler's own record of one scheduled sequence (live objects; the executor gets plain data): compute
    `num_new_tokens` tokens of `seq` from position `start_pos` (= its computed tokens)."""

    __slots__ = ("request", "seq", "seq_index", "num_new_tokens", "start_pos", "samples", "num_samples")

    def __init__(self, request: Request, seq: Sequence, seq_index: int, num_new_tokens: int) -> None:
        self.request = request
        self.seq = seq
        self.seq_index = seq_index          # index of seq in request.seqs (stable: seeds per sample)
        self.num_new_tokens = num_new_tokens
        self.start_pos = seq.num_computed_tokens
        # Whether this step reaches the end of the sequence, so a next token is sampled from its last position;
        # n samples when an n>1 request forks from its prompt, otherwise one.
        self.samples = self.start_pos + num_new_tokens == len(seq.token_ids) + seq.num_placeholders
        self.num_samples = request.sampling_params.n if self.samples and request.needs_fork else 1


@dataclass
class ScheduledBatch:
    """One step as the scheduler and the engine see it: the SchedulerOutput's rows as live objects."""
    seqs: list[ScheduledSeq] = field(default_factory=list)       # aligned with SchedulerOutput.seq_ids
    preempted: list[Request] = field(default_factory=list)
    rejected: list[Request] = field(default_factory=list)


@dataclass
class DecodeRunPlan:
    """A regular decode run from here (Scheduler.plan_decode_run): its sequences in batch order, and after each of
    its steps the blocks they have entered since it began (cumulative); the run may stop after any of them."""
    requests: list[Request]         # per sequence, its request
    seqs: list[Sequence]
    num_computed_tokens: list[int]  # per sequence, when the run begins
    blocks_entered: list[int]
    steps_to_length: list[int]      # per sequence: the steps after which check_stop stops it by length
    horizon: int                    # the steps the scheduler allows: to the first stop, or max_steps

    def blocks_run_out_after(self, steps: int) -> bool:
        """Whether the allocator cannot serve the step after the first `steps`: it planned fewer steps than the
        horizon (it stops before a step it could not serve) and the run went that far. No sequence stops before
        the horizon, so nothing is freed and the next step is not a decode run either."""
        return steps == len(self.blocks_entered) < self.horizon
