"""The output stage: sampled token ids in, text, stop strings and vLLM-shaped RequestOutputs out.

Both halves decode incrementally and check stop strings with the same IncrementalDetokenizer (detokenizer.py):
- OutputProcessor is the offline engine's, run right after Scheduler.update: a sequence a stop string ended is
  finished at once, so its blocks are free before the next step is scheduled.
- RequestState is the API server's, fed the engine core's token-id deltas. The core never touches text; a stop
  string found here is reported to the core (StopSequences), which finishes the sequence. Tokens the core sampled
  before that arrived are not part of the output.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedlab.engine.detokenizer import IncrementalDetokenizer
from pagedlab.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedlab.sampling_params import SamplingParams
from pagedlab.sequence import FinishReason, Request

if TYPE_CHECKING:       # the wire format needs the serve extra (msgspec); the offline engine does not
    from pagedlab.engine.core_messages import CompletionDelta, EngineCoreOutput


# --- the offline engine's ------------------------------------------------------------------------------------
class OutputProcessor:
    """Text for the requests that want it as tokens arrive (streaming, stop strings), decoded at O(new tokens) a
    step; a request that wants neither is decoded once, when it finishes. `detokenize = False` (the engine core):
    no text at all, the API server's front end owns it."""

    def __init__(self, scheduler, tokenizer=None) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.detokenize = True
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}    # seq_id -> its text so far
        self._sent: dict[int, int] = {}                                 # seq_id -> tokens already reported

    def process(self, requests: Iterable[Request]) -> list[Request]:
        """After Scheduler.update: decode the requests' new tokens and finish the sequences a stop string (or a
        failure to decode) ended, freeing their blocks; returns the requests that finished so."""
        if self.tokenizer is None or not self.detokenize:
            return []
        ended = []
        for request in requests:
            if not (request.stream or request.sampling_params.stop_strings):
                continue
            for seq in request.seqs:
                try:
                    stop = self._update_text(request, seq)
                except Exception as exc:  # noqa: BLE001 - a failure in one request ends that request only
                    request.error = f"{type(exc).__name__}: {exc}"
                    seq.finish_reason = FinishReason.ERROR
                    ended.append(request)
                    continue
                if stop is not None and seq.finish_reason in (None, FinishReason.STOP, FinishReason.LENGTH):
                    seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
                    ended.append(request)
        return self.scheduler.retire_finished(dict.fromkeys(ended)) if ended else []

    def _update_text(self, request: Request, seq) -> str | None:
        detokenizer = self._detokenizers.get(seq.seq_id)
        if detokenizer is None:
            detokenizer = self._detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer,
                                                                                   request.sampling_params)
        new_token_ids = seq.token_ids[seq.num_prompt_tokens + detokenizer.num_tokens:]
        if not new_token_ids or detokenizer.finished:
            return None
        return detokenizer.update(new_token_ids, seq.finish_reason is not None)

    def make_output(self, request: Request) -> RequestOutput:
        finished = request.is_finished
        params = request.sampling_params
        completions, deltas = [], []
        for index, seq in enumerate(request.seqs):
            detokenizer = self._detokenizers.get(seq.seq_id)
            if detokenizer is not None:
                seq.output_text = detokenizer.text
            elif finished and self.tokenizer is not None and self.detokenize:
                seq.output_text = self.tokenizer.decode(seq.output_token_ids,
                                                        skip_special_tokens=params.skip_special_tokens)
            completions.append(CompletionOutput(
                index=index, text=seq.output_text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
                logprobs=list(seq.logprobs) if params.logprobs is not None else None,
                finish_reason=None if seq.finish_reason is None else seq.finish_reason.value,
                stop_reason=seq.stop_reason))
            deltas.append(seq.num_output_tokens - self._sent.get(seq.seq_id, 0))
            self._sent[seq.seq_id] = seq.num_output_tokens
        if finished:
            for seq in request.seqs:
                self._sent.pop(seq.seq_id, None)
                self._detokenizers.pop(seq.seq_id, None)
        metrics = RequestMetrics(request.arrival_time, request.first_scheduled_time, request.first_token_time,
                                 request.last_token_time, request.finished_time, request.num_cached_tokens,
                                 request.num_preemptions)
        return RequestOutput(request.request_id, request.prompt, list(request.prompt_token_ids), completions,
                             finished, metrics, request.error, deltas, request.completed_prompt_logprobs())


# --- the API server's ----------------------------------------------------------------------------------------
@dataclass
class _Completion:
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        return "" if self.detokenizer is None else self.detokenizer.text


class RequestState:
    """One request in flight on this API server: what its outputs add up to, and the queue its caller reads.
    `stops` lists the (completion index, stop string) pairs found since the core was last told."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer, arrival_time: float) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.params, self.tokenizer = params, tokenizer
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.completions: list[_Completion] = []
        self.metrics = RequestMetrics(arrival_time, None, None, None, None)
        self.rejected = False
        self.prompt_logprobs = None
        self.stops: list[tuple[int, str]] = []

    def update(self, output: EngineCoreOutput) -> RequestOutput:
        num_new = [self._apply(delta) for delta in output.completions]
        if output.metrics is not None:
            self.metrics = output.metrics
        self.rejected = output.rejected
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        finished = output.finished or (len(self.completions) == self.params.n
                                       and all(c.finish_reason is not None for c in self.completions))
        if finished and self.metrics.finished_time is None:     # stopped here, before the core knew
            self.metrics.finished_time = time.monotonic()
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids,
            [CompletionOutput(i, c.text, list(c.token_ids), c.cumulative_logprob,
                              None if c.logprobs is None else list(c.logprobs), c.finish_reason, c.stop_reason)
             for i, c in enumerate(self.completions)],
            finished, self.metrics, output.error, num_new, self.prompt_logprobs)

    def _apply(self, delta: CompletionDelta) -> int:
        while len(self.completions) <= delta.index:
            self.completions.append(_Completion(
                None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, self.params)))
        completion = self.completions[delta.index]
        if completion.finish_reason is not None:        # a stop string ended it here; the core sampled on
            return 0
        new_token_ids, new_logprobs = delta.new_token_ids, delta.new_logprobs
        cumulative_logprob = delta.cumulative_logprob
        detokenizer = completion.detokenizer
        if detokenizer is not None and detokenizer.update(new_token_ids, delta.finish_reason is not None) is not None:
            keep = detokenizer.num_tokens - len(completion.token_ids)
            if new_logprobs is not None and cumulative_logprob is not None:
                cumulative_logprob -= sum(lp.get(t, 0.0) for t, lp in zip(new_token_ids[keep:], new_logprobs[keep:]))
                new_logprobs = new_logprobs[:keep]
            new_token_ids = new_token_ids[:keep]
            completion.finish_reason, completion.stop_reason = FinishReason.STOP.value, detokenizer.stop_reason
            self.stops.append((delta.index, detokenizer.stop_reason))
        completion.token_ids.extend(new_token_ids)
        if new_logprobs is not None:
            if completion.logprobs is None:
                completion.logprobs = []
            completion.logprobs.extend(new_logprobs)
            completion.cumulative_logprob = cumulative_logprob
        if delta.finish_reason is not None and completion.finish_reason is None:
            completion.finish_reason, completion.stop_reason = delta.finish_reason, delta.stop_reason
        return len(new_token_ids)
