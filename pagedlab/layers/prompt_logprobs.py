"""Prompt logprobs (SamplingParams.prompt_logprobs): the LM head over prompt rows, a bounded number at a time.

A step that computes prompt logprobs runs the LM head over up to max_num_batched_tokens prompt rows besides its
sampling rows. Their logits whole ([rows, vocab], then a float32 copy and its log-softmax) would be far more than the
memory profile measured, which is the LM head over `logit_rows_per_pass` rows (and the sampler's work on them):
at a high gpu_memory_utilization that is an out-of-memory error. So `lm_head` runs the LM head over the step's rows
in passes of at most that many rows, reduces each pass's prompt rows to what is reported (the prompt token's
logprob and the top ones) and lets its logits go; the sampling rows, at most max_num_seqs, come from the first pass
whole. Every tensor-parallel rank makes the same passes (the LM head gathers across ranks); only rank 0 reduces.
The spans are plain data the runner reads off its persistent batch (`PromptLogprobSpan`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pagedlab.config import SchedulerConfig
from pagedlab.sched_output import SampleResult


def logit_rows_per_pass(scheduler: SchedulerConfig) -> int:
    """The LM head rows of one pass: as many as the memory profile's run computes logits for."""
    return min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens)


@dataclass(frozen=True, slots=True)
class PromptLogprobSpan:
    """Prompt positions first .. first + count - 1 of one scheduled row, whose next-token logprobs this step
    computes: position p gives the logprob of prompt token p + 1, which is next_token_ids[p - first]."""
    row: int                        # index of the scheduled row
    first: int
    next_token_ids: Sequence[int]
    num_top: int                    # SamplingParams.prompt_logprobs: how many of the most likely tokens too

    @property
    def count(self) -> int:
        return len(self.next_token_ids)


def prompt_logprob_range(start: int, num_new_tokens: int, num_prompt_tokens: int,
                         first_wanted: int) -> tuple[int, int]:
    """(first, end) of the prompt positions with a wanted next-token logprob among those computed this step, from
    position start on; positions before first_wanted were reported by an earlier pass (before a recompute)."""
    return max(start, first_wanted), min(start + num_new_tokens, num_prompt_tokens - 1)


@dataclass
class StepLogits:
    """The LM head's output for a step: the sampling rows' logits (None on ranks > 0) and the prompt rows reduced
    to the prompt token's logprob ([rows]) and the top `k` ([rows, k]), in span order."""
    logits: torch.Tensor | None
    chosen: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    spans: list[PromptLogprobSpan] = field(default_factory=list)


@torch.inference_mode()
def lm_head(compute_logits, hidden: torch.Tensor, num_sampling: int, spans: list[PromptLogprobSpan],
            rows_per_pass: int) -> StepLogits:
    """hidden: the num_sampling sampling rows, then the spans' prompt rows (HostBatch's sample_rows order)."""
    if not spans and len(hidden) <= rows_per_pass:      # no prompt logprobs: the plain LM head (every step's case)
        return StepLogits(compute_logits(hidden))
    next_tokens = torch.tensor([t for span in spans for t in span.next_token_ids], dtype=torch.int64,
                               device=hidden.device)
    k = max((span.num_top for span in spans), default=0)
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
    step = StepLogits(torch.cat(sampling) if len(sampling) > 1 else sampling[0], spans=spans)
    if chosen:
        step.chosen = torch.cat(chosen)
        if k:
            step.top_values, step.top_ids = torch.cat(top_values), torch.cat(top_ids)
    return step


def attach_prompt_logprobs(step: StepLogits, results: list[SampleResult | None]) -> list[SampleResult | None]:
    """Each span's prompt logprobs ({prompt token: logprob} plus its request's top `prompt_logprobs`) on its
    row's result (an empty one where the step ends mid-prompt)."""
    if step.chosen is None:
        return results
    spans = step.spans
    next_tokens = [t for span in spans for t in span.next_token_ids]
    chosen = step.chosen.tolist()
    top_values = step.top_values.tolist() if step.top_values is not None else [[]] * len(chosen)
    top_ids = step.top_ids.tolist() if step.top_ids is not None else [[]] * len(chosen)
    row = 0
    for span in spans:
        top = span.num_top
        entries = [{next_tokens[r]: chosen[r], **dict(zip(top_ids[r][:top], top_values[r][:top]))}
                   for r in range(row, row + span.count)]
        row += span.count
        result = results[span.row] = results[span.row] or SampleResult([])
        result.prompt_logprobs, result.prompt_logprobs_start = entries, span.first
    return results
