"""When a sequence stops: one check after each new token, used by the scheduler and by the simulator's decode runs.

In order (vLLM's meanings): once `min_tokens` output tokens exist, an EOS token (unless `ignore_eos`) or one of
`stop_token_ids` stops it with "stop" (a stop token id is its `stop_reason`); otherwise reaching `max_tokens` output
tokens or `max_model_len` tokens in all stops it with "length". Stop strings need text, so the output stage checks
them on the detokenized output.
"""
from __future__ import annotations

from collections.abc import Collection

from pagedlab.sampling_params import SamplingParams
from pagedlab.sequence import FinishReason, Request, Sequence


def check_stop(request: Request, seq: Sequence, eos_token_ids: Collection[int], max_model_len: int) -> bool:
    """Whether `seq` stops after its last token; if so its finish_reason (and stop_reason) say why."""
    params, token_ids = request.sampling_params, seq.token_ids
    num_tokens = len(token_ids)
    if num_tokens - seq.num_prompt_tokens >= params.min_tokens:
        token = token_ids[-1]
        if token in eos_token_ids and not params.ignore_eos:
            seq.finish_reason = FinishReason.STOP
            return True
        if params.stop_token_ids and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, token
            return True
    if num_tokens >= request.max_total_tokens(max_model_len):
        seq.finish_reason = FinishReason.LENGTH
        return True
    return False


def stops_only_by_length(params: SamplingParams, eos_token_ids: Collection[int]) -> bool:
    """Whether check_stop can stop a sequence of these params only by length, whatever its tokens are."""
    return not params.stop_token_ids and (params.ignore_eos or not eos_token_ids)
