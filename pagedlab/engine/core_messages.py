"""What crosses the process boundary between the API servers and the engine core: msgspec structs in msgpack.

Front end -> core (one socket, every API server pushes to it): AddRequest, AbortRequests, StopSequences (the front
end decodes text and found a stop string), UtilityCall.
Core -> front end (one socket per API server): EngineCoreOutputs, one message per step holding every new token of
that API server's requests, their finish states and the answers to its utility calls (and, for a client that
watches the engine step by step, StepReports).

SamplingParams travel pickled inside AddRequest, so every field, today's and any added later, arrives whole without
this module knowing it. Outputs grow the same way: a new per-request field is a new struct field with a default
(omit_defaults keeps it off the wire when unused).
"""
from __future__ import annotations

import pickle
from typing import Any, Union

import msgspec

from pagedlab.outputs import RequestMetrics
from pagedlab.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag="add", array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: bytes                  # pickled SamplingParams
    arrival_time: float
    client_index: int = 0
    stream: bool = True                     # False: one message when it finishes, none per step
    cache_salt: str | None = None

    @classmethod
    def make(cls, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
             client_index: int, stream: bool, cache_salt: str | None = None) -> AddRequest:
        return cls(request_id, prompt_token_ids, pickle.dumps(params, protocol=pickle.HIGHEST_PROTOCOL),
                   arrival_time, client_index, stream, cache_salt)

    def params(self) -> SamplingParams:
        return pickle.loads(self.sampling_params)


class AbortRequests(msgspec.Struct, tag="abort", array_like=True, gc=False):
    request_ids: list[str]


class StopSequences(msgspec.Struct, tag="stop", array_like=True, gc=False):
    """Sequences of a request (by completion index) that a stop string ended: the core finishes them."""
    request_id: str
    indexes: list[int]
    stop_reasons: list[str]


class UtilityCall(msgspec.Struct, tag="call", array_like=True, gc=False):
    client_index: int
    call_id: int
    method: str                             # one of EngineCore.UTILITIES
    args: bytes = b""                       # pickled tuple


CoreInput = Union[AddRequest, AbortRequests, StopSequences, UtilityCall]


class CompletionDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One sequence's news since the last message: its new tokens (and their logprobs), and how it ended."""
    index: int
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    completions: list[CompletionDelta]
    finished: bool = False
    error: str | None = None
    rejected: bool = False                  # the error is the request's own (a 4xx), not a failure
    metrics: RequestMetrics | None = None   # on the finished message
    prompt_logprobs: list[dict[int, float] | None] | None = None   # on the request's first message


class UtilityResult(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    call_id: int
    result: bytes = b""                     # pickled
    error: str | None = None


class FollowedRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request a watching client follows, after a step: its status, text so far, and block table as
    (physical block id, slots filled) pairs."""
    request_id: str
    status: str
    text: str = ""
    prompt_tokens: int = 0
    block_size: int = 0
    blocks: list[tuple[int, int]] = []
    error: str | None = None


class StepReport(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One engine step for a client that watches every step (the lab's live dashboard): StepStats' fields, the KV
    cache's slot accounting and the requests it follows. `ended` (with empty stats) says the run is over and why."""
    time: float                             # time.monotonic() at the step's end: one clock for the machine
    stats: dict[str, float] = {}
    memory: dict[str, float] = {}
    followed: list[FollowedRequest] = []
    ended: str | None = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    utility_results: list[UtilityResult] = []
    steps: list[StepReport] = []            # only to a client that watches steps


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def input_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(CoreInput)


def output_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(EngineCoreOutputs)


def pickled(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
