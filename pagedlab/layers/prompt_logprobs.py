"""Prompt logprobs (SamplingParams.prompt_logprobs): the LM head over prompt rows, a bounded number at a time.

A step that computes prompt logprobs runs the LM head over up to max_num_batched_tokens prompt rows besides its
sampling rows. Their logits whole ([rows, vocab], then a float32 copy and its log-softmax) would be far more than the
memory profile measured, which is the LM head over `logit_rows_per_pass` rows (and the sampler's work on them):
at a high gpu_memory_utilization that is an out-of-memory error. So `lm_head` runs the LM head over the step's rows
in passes of at most that many rows, reduces each pass's prompt rows to what is reported (the prompt token's
logprob and the top ones) and lets its logits go; the sampling rows, at most max_num_seqs, come from the first pass
whole. Every tensor-parallel rank makes the same passes (the LM head gathers across ranks); only rank 0, whose
`scheduled` is the step's, reduces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedlab.config import SchedulerConfig
from pagedlab.executor.base import SampleResult, ScheduledSeq


def logit_rows_per_pass(scheduler: SchedulerConfig) -> int:
    """The LM head rows of one pass: as many as the memory profile's run computes logits for."""
    return min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens)


def prompt_logprob_spans(scheduled: list[ScheduledSeq]) -> list[tuple[int, int, int]]:
    """(index in scheduled, first position, count) of the prompt positions whose next-token logprobs this step
    computes: position p gives the logprob of prompt token p + 1. Positions an earlier pass already reported
    (before a recompute preemption) are skipped."""
    spans = []
    for i, s in enumerate(scheduled):
        request = s.request
        if request.sampling_params.prompt_logprobs is None or s.seq_index:
            continue
        first = max(s.start_pos, len(request.prompt_logprobs or [None]) - 1)
        end = min(s.start_pos + s.num_new_tokens, s.seq.num_prompt_tokens - 1)
        if end > first:
            spans.append((i, first, end - first))
    return spans


@dataclass
class StepLogits:
    """The LM head's output for a step: the sampling rows' logits (None on ranks > 0) and the prompt rows reduced
    to the prompt token's logprob ([rows]) and the top `k` ([rows, k]), in span order."""
    logits: torch.Tensor | None
    chosen: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None


@torch.inference_mode()
def lm_head(compute_logits, hidden: torch.Tensor, scheduled: list[ScheduledSeq], rows_per_pass: int
            ) -> StepLogits:
    """hidden: the sampling rows, then the prompt-logprob rows (HostBatch's sample_rows order)."""
    spans = prompt_logprob_spans(scheduled)
    if not spans and len(hidden) <= rows_per_pass:      # no prompt logprobs: the plain LM head (every step's case)
        return StepLogits(compute_logits(hidden))
    num_sampling = sum(1 for s in scheduled if s.samples)
    next_tokens = torch.tensor([t for i, first, count in spans
                                for t in scheduled[i].seq.token_ids[first + 1:first + 1 + count]],
                               dtype=torch.int64, device=hidden.device)
    k = max((scheduled[i].request.sampling_params.prompt_logprobs for i, _, _ in spans), default=0)
    sampling, chosen, top_values, top_ids = [], [], [], []
    for start in range(0, len(hidden), rows_per_pass):
        logits = compute_logits(hidden[start:start + rows_per_pass])
        if logits is None:          # a rank > 0: the LM head gathered its part to rank 0
            continue
        if start == 0 or start < num_sampling:
            sampling.append(logits[:max(num_sampling - start, 0)])
        prompt = logits[max(num_sampling - start, 0):]
        if len(prompt):
            logprobs = prompt.to(torch.float32).log_softmax(dim=-1)
            del logits, prompt
            rows = next_tokens[max(start - num_sampling, 0):][:len(logprobs)]
            chosen.append(logprobs.gather(1, rows.unsqueeze(1)).squeeze(1))
            if k:
                values, ids = logprobs.topk(k, dim=-1)
                top_values.append(values)
                top_ids.append(ids)
            del logprobs
    if not sampling:
        return StepLogits(None)
    step = StepLogits(torch.cat(sampling) if len(sampling) > 1 else sampling[0])
    if chosen:
        step.chosen = torch.cat(chosen)
        if k:
            step.top_values, step.top_ids = torch.cat(top_values), torch.cat(top_ids)
    return step


def attach_prompt_logprobs(step: StepLogits, scheduled: list[ScheduledSeq],
                           results: list[SampleResult | None]) -> list[SampleResult | None]:
    """Each span's prompt logprobs ({prompt token: logprob} plus its request's top `prompt_logprobs`) on its
    sequence's result (an empty one where the step ends mid-prompt)."""
    if step.chosen is None:
        return results
    spans = prompt_logprob_spans(scheduled)
    next_tokens = [t for i, first, count in spans for t in scheduled[i].seq.token_ids[first + 1:first + 1 + count]]
    chosen = step.chosen.tolist()
    top_values = step.top_values.tolist() if step.top_values is not None else [[]] * len(chosen)
    top_ids = step.top_ids.tolist() if step.top_ids is not None else [[]] * len(chosen)
    row = 0
    for i, first, count in spans:
        top = scheduled[i].request.sampling_params.prompt_logprobs
        entries = [{next_tokens[r]: chosen[r], **dict(zip(top_ids[r][:top], top_values[r][:top]))}
                   for r in range(row, row + count)]
        row += count
        result = results[i] = results[i] or SampleResult([])
        result.prompt_logprobs, result.prompt_logprobs_start = entries, first
    return results
