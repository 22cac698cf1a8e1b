"""The seam between the scheduler and an executor, both ways, as plain data (vLLM V1's `sched/output.py`).

Each step the scheduler sends a `SchedulerOutput`: ids, token ids, block ids and sampling parameters, never a live
request, sequence or allocator, so it pickles and can cross a process. A sequence the worker holds no state for
comes whole (`NewSeqData`); one it already holds comes as a diff (`CachedSeqData`: the tokens appended and the
blocks added since the worker last saw it). The worker keeps its own copy of every sequence's tokens and block
table (`executor/input_batch.py`) and updates it from these diffs. What comes back is a `SampleResult` per
scheduled sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedlab.sampling_params import SamplingParams


@dataclass
class NewSeqData:
    """A sequence the worker does not hold: first scheduled, forked from its parent, or back after a preemption."""
    seq_id: int
    req_id: str
    seq_index: int                      # index in its request's sequences (seeds are per sample)
    token_ids: list[int]                # every token so far, prompt first
    num_prompt_tokens: int
    block_ids: list[int]                # its whole block table
    sampling_params: SamplingParams
    # SamplingParams.prompt_logprobs: the first prompt position whose next-token logprob is still wanted (an
    # earlier pass, before a recompute preemption, reported the ones before it)
    prompt_logprobs_start: int = 0


@dataclass
class CachedSeqData:
    """Sequences the worker holds, one column per field (one entry per sequence)."""
    seq_ids: list[int] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)   # appended since last seen: the sampled token
    new_block_ids: list[list[int]] = field(default_factory=list)   # appended to its block table since last seen


@dataclass
class SchedulerOutput:
    step: int
    # One entry per scheduled sequence, in batch order; an executor's results come back aligned with seq_ids.
    seq_ids: list[int] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)   # the first position computed this step
    # Tokens sampled after this step: 0 mid-prompt, n when an n>1 request forks from its prompt, otherwise 1.
    num_samples: list[int] = field(default_factory=list)
    new_seqs: list[NewSeqData] = field(default_factory=list)
    cached_seqs: CachedSeqData = field(default_factory=CachedSeqData)
    # Copy-on-write replaced an entry of a held sequence's block table: (seq_id, index, new block id).
    replaced_block_ids: list[tuple[int, int, int]] = field(default_factory=list)
    # What the worker forgets: sequences that ended, the requests that ended (their seeded generators too), and
    # preempted sequences (their blocks moved or dropped; they come back as new).
    finished_seq_ids: list[int] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)
    preempted_seq_ids: list[int] = field(default_factory=list)
    # Block moves the executor performs before the forward pass, in this order: swap-out, swap-in, copy.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)   # (gpu block, cpu block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)    # (cpu block, gpu block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)       # (src gpu block, dst gpu block)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seq_ids

    @property
    def has_work(self) -> bool:
        """Anything for an executor to do: tokens to compute or blocks to move."""
        return bool(self.seq_ids or self.blocks_to_swap_out or self.blocks_to_swap_in or self.blocks_to_copy)


@dataclass
class SampleResult:
    token_ids: list[int]                                   # num_samples tokens
    logprobs: list[dict[int, float]] | None = None         # per token: {token_id: logprob}, chosen + top-k
    # Prompt logprobs computed this step: entry j is that of prompt token prompt_logprobs_start + 1 + j.
    # A step that ends mid-prompt returns them with no token_ids.
    prompt_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs_start: int = 0
