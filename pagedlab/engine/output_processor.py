"""The front end's half of a request: the engine core's token-id deltas in, vLLM-shaped RequestOutputs out.

Text is decoded here, incrementally (detokenizer.py), so the core touches text only for requests with stop strings:
it checks them with the same LLMEngine code and the same incremental decoding as the offline LLM, and reports the
one it hit; the text here is cut at it.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pagedlab.engine.core_messages import CompletionDelta, EngineCoreOutput
from pagedlab.engine.detokenizer import IncrementalDetokenizer
from pagedlab.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedlab.sampling_params import SamplingParams


@dataclass
class _Completion:
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    final_text: str | None = None

    @property
    def text(self) -> str:
        if self.final_text is not None:
            return self.final_text
        return "" if self.detokenizer is None else self.detokenizer.text


class RequestState:
    """One request in flight on this API server: what its outputs add up to, and the queue its caller reads."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer, arrival_time: float) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.params, self.tokenizer = params, tokenizer
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.completions: list[_Completion] = []
        self.metrics = RequestMetrics(arrival_time, None, None, None, None)
        self.rejected = False
        self.prompt_logprobs = None

    def update(self, output: EngineCoreOutput) -> RequestOutput:
        num_new = [self._apply(delta) for delta in output.completions]
        if output.metrics is not None:
            self.metrics = output.metrics
        self.rejected = output.rejected
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids,
            [CompletionOutput(i, c.text, list(c.token_ids), c.cumulative_logprob,
                              None if c.logprobs is None else list(c.logprobs), c.finish_reason, c.stop_reason)
             for i, c in enumerate(self.completions)],
            output.finished, self.metrics, output.error, num_new, self.prompt_logprobs)

    def _apply(self, delta: CompletionDelta) -> int:
        while len(self.completions) <= delta.index:
            self.completions.append(_Completion(None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, self.params.skip_special_tokens)))
        completion = self.completions[delta.index]
        completion.token_ids.extend(delta.new_token_ids)
        if completion.detokenizer is not None:
            completion.detokenizer.add(delta.new_token_ids)
        if delta.new_logprobs is not None:
            if completion.logprobs is None:
                completion.logprobs = []
            completion.logprobs.extend(delta.new_logprobs)
            completion.cumulative_logprob = delta.cumulative_logprob
        if delta.finish_reason is not None and completion.finish_reason is None:
            completion.finish_reason, completion.stop_reason = delta.finish_reason, delta.stop_reason
            if isinstance(delta.stop_reason, str):      # a stop string: the core stopped at its first occurrence
                text, stop = completion.text, delta.stop_reason
                at = text.find(stop)
                if at != -1:
                    completion.final_text = text[:at + (len(stop) if self.params.include_stop_str_in_output else 0)]
        return len(delta.new_token_ids)
