"""Requests and their sequences: the token state the scheduler moves between queues.

A request holds one sequence until its prompt is computed; with `n > 1` it then forks into n sequences that
share the prompt's KV blocks (copy-on-write protects the shared partial block).
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from pagedlab.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS, a stop token or a stop string
    LENGTH = "length"        # max_tokens or max_model_len reached
    ABORT = "abort"          # abort(request_id)
    ERROR = "error"          # rejected or failed: Request.error says why


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One stream of tokens with its own KV blocks (held by the cache manager under `seq_id`)."""

    token_ids: list[int]
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    output_text: str = ""
    cumulative_logprob: float = 0.0
    # Async scheduling: tokens sampled by launched steps that have not come back yet. The scheduler counts them as
    # the sequence's (its next step starts after them); the worker reads them off the device.
    num_placeholders: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def fork(self) -> "Sequence":
        return Sequence(list(self.token_ids), self.num_prompt_tokens,
                        num_computed_tokens=self.num_computed_tokens, logprobs=list(self.logprobs),
                        output_text=self.output_text, cumulative_logprob=self.cumulative_logprob)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    error: str | None = None
    stream: bool = False           # text wanted as tokens arrive (stop strings decode as they arrive anyway)
    cache_salt: str | None = None  # joins the prefix hash: requests with different salts never share blocks
    num_cached_tokens: int = 0     # prompt tokens served by the prefix cache at admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    # SamplingParams.prompt_logprobs: entry k that of prompt token k (the first is None, as in vLLM)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    grammar: object | None = None  # structured outputs: a RequestGrammar (pagedlab.structured_outputs)

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [Sequence(list(self.prompt_token_ids), len(self.prompt_token_ids))]

    def record_prompt_logprobs(self, start: int, entries: list[dict[int, float]]) -> None:
        """Entries for prompt tokens start + 1, start + 2, ... (a recompute pass may report some again)."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None]
        del self.prompt_logprobs[start + 1:]
        self.prompt_logprobs.extend(entries)

    def completed_prompt_logprobs(self) -> list[dict[int, float] | None] | None:
        """The prompt logprobs once every prompt token has one (None before, or when none were asked for)."""
        if self.sampling_params.prompt_logprobs is None:
            return None
        if self.num_prompt_tokens == 1:
            return [None]
        if self.prompt_logprobs is None or len(self.prompt_logprobs) < self.num_prompt_tokens:
            return None
        return list(self.prompt_logprobs)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if s.finish_reason is None]

    @property
    def is_finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    @property
    def needs_fork(self) -> bool:
        """True while an n>1 request still has its single prompt sequence."""
        return self.sampling_params.n > 1 and len(self.seqs) == 1

    def max_total_tokens(self, max_model_len: int) -> int:
        """The most tokens one of its sequences can reach."""
        max_tokens = self.sampling_params.max_tokens     # (no min() or property: called for every token)
        if max_tokens is None:
            return max_model_len
        limit = len(self.prompt_token_ids) + max_tokens
        return limit if limit < max_model_len else max_model_len
