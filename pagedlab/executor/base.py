"""What the scheduler hands an executor each step, and what comes back.

An executor is the model runner (real forward passes on the paged KV cache) or the simulator (a cost model).
Both take the same `SchedulerOutput`, so the scheduler and memory manager never know which one runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pagedlab.sequence import Request, Sequence


class ScheduledSeq:
    """Compute `num_new_tokens` tokens of `seq`, starting at position `start_pos` (= its computed tokens)."""

    __slots__ = ("request", "seq", "seq_index", "num_new_tokens", "start_pos", "samples", "num_samples", "_kv")

    def __init__(self, request: Request, seq: Sequence, seq_index: int, num_new_tokens: int, kv) -> None:
        self.request = request
        self.seq = seq
        self.seq_index = seq_index          # index of seq in request.seqs (stable: seeds per sample)
        self.num_new_tokens = num_new_tokens
        self.start_pos = seq.num_computed_tokens
        # Whether this step reaches the end of the sequence, so a next token is sampled from its last position;
        # n samples when an n>1 request forks from its prompt, otherwise one.
        self.samples = self.start_pos + num_new_tokens == len(seq.token_ids)
        self.num_samples = request.sampling_params.n if self.samples and request.needs_fork else 1
        self._kv = kv

    @property
    def new_token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start_pos:self.start_pos + self.num_new_tokens]

    @property
    def block_table(self) -> list[int]:
        """Physical block ids of the sequence, covering every position computed this step."""
        return self._kv.block_table(self.seq)


@dataclass
class SchedulerOutput:
    step: int
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    # Block moves the executor performs before the forward pass, in this order: swap-out, swap-in, copy.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)   # (gpu block, cpu block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)    # (cpu block, gpu block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)       # (src gpu block, dst gpu block)
    preempted: list[Request] = field(default_factory=list)
    rejected: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SampleResult:
    token_ids: list[int]                                   # num_samples tokens
    logprobs: list[dict[int, float]] | None = None         # per token: {token_id: logprob}, chosen + top-k
    # Prompt logprobs computed this step: entry j is that of prompt token prompt_logprobs_start + 1 + j.
    # A step that ends mid-prompt returns them with no token_ids.
    prompt_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs_start: int = 0


class Executor(Protocol):
    def execute(self, out: SchedulerOutput) -> list[SampleResult | None]:
        """One result per scheduled seq, aligned; None where the seq does not sample (nor has prompt logprobs)
        this step."""
