"""Sampler: logits of the sampling rows -> next tokens, honoring every SamplingParams field (vLLM semantics).

Order: allowed_token_ids, bad_words, logit_bias and a grammar's bitmask (logits_processors), min_tokens masks stop
tokens, penalties, then greedy argmax or temperature -> top-k -> top-p -> min-p ->
a draw. Draws use the exponential race (argmax of probs / Exp(1) noise), so a seeded row consumes exactly one
noise vector per token from its own generator: seeded outputs do not depend on what else is in the batch.
Logprobs are those of the raw model distribution, before any processing; so are prompt logprobs (prompt_logprobs.py).

The sampler sees plain data only: a `SamplingRow` per row (ids, SamplingParams, the row's tokens) and, for
structured outputs, a token bitmask the engine filled.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from pagedlab.layers.logits_processors import GrammarBitmask, apply_grammar_bitmask, apply_token_constraints
from pagedlab.layers.staging import staged
from pagedlab.sampling_params import SamplingParams
from pagedlab.sched_output import SampleResult

SAMPLING_EPS = 1e-5     # temperatures below this are greedy (dividing by them overflows)


def token_counts(token_lists: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[N, V] float: how often each token occurs in each list."""
    width = max(map(len, token_lists), default=0)
    ids = staged([t + [vocab_size] * (width - len(t)) for t in token_lists], device, torch.int64)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]],
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Repetition penalty (HF: over prompt and output tokens), then OpenAI presence/frequency (output tokens)."""
    vocab_size = logits.shape[1]
    output_counts = token_counts(output_ids, vocab_size, logits.device)
    seen = (token_counts(prompt_ids, vocab_size, logits.device) > 0) | (output_counts > 0)
    repetition = repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - frequency.unsqueeze(1) * output_counts - presence.unsqueeze(1) * (output_counts > 0)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k logits (ties at the k-th kept), then the smallest set whose probability reaches top_p.
    top_k [N] int64 (vocab size = off), top_p [N] float (1 = off); the rest become -inf."""
    sorted_logits, order = logits.sort(dim=-1)     # ascending
    kth_largest = sorted_logits.gather(1, (logits.shape[1] - top_k).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside_top_p = cumulative <= 1 - top_p.unsqueeze(1)
    outside_top_p[:, -1] = False      # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(outside_top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens less likely than min_p times the row's most likely token."""
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < threshold, 0.0)


def is_plain_greedy(p: SamplingParams) -> bool:
    """Greedy with nothing else to do: the argmax of the raw logits is the token."""
    return (p.temperature < SAMPLING_EPS and p.logprobs is None and p.n == 1 and not p.uses_penalties
            and not p.min_tokens and not p.masks_logits)


@dataclass(slots=True)
class SamplingRow:
    """One row to sample from: whose it is and everything the sampling parameters read."""
    req_id: str
    seq_index: int                      # the sequence's index in its request (a seed's stream per sample)
    params: SamplingParams
    token_ids: Sequence[int]            # the sequence's tokens so far, prompt first
    num_prompt_tokens: int
    num_samples: int = 1                # n when an n>1 request forks from its prompt here

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self.token_ids[:self.num_prompt_tokens])

    @property
    def output_token_ids(self) -> list[int]:
        return list(self.token_ids[self.num_prompt_tokens:])

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class SampledTokens:
    """What the sampler drew, still where it was drawn (on the device): one token per sample, rows in order, and
    the logprob tensors of the rows that want them. `results()` turns it into SampleResults on the host."""
    tokens: torch.Tensor                            # [samples]
    num_samples: list[int]                          # per row
    logprobs: list[int | None] | None = None        # per row: SamplingParams.logprobs (None: no row wants any)
    chosen: torch.Tensor | None = None              # [samples]: the logprob of each sampled token
    top_values: torch.Tensor | None = None          # [samples, k]
    top_ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in ("tokens", "chosen", "top_values", "top_ids")
                if getattr(self, name) is not None}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> "SampledTokens":
        """The same draw over other copies of its tensors (their host copies)."""
        return replace(self, **tensors)

    def results(self) -> list[SampleResult]:
        token_list = self.tokens.tolist()
        if self.logprobs is None:
            if len(token_list) == len(self.num_samples):
                return [SampleResult([token]) for token in token_list]
            per_sample = None
        else:
            chosen, top_values, top_ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
            rows = [i for i, n in enumerate(self.num_samples) for _ in range(n)]
            per_sample = []
            for j, (i, token) in enumerate(zip(rows, token_list)):
                k = self.logprobs[i] or 0
                per_sample.append({token: chosen[j], **dict(zip(top_ids[j][:k], top_values[j][:k]))})
        results, j = [], 0
        for i, n in enumerate(self.num_samples):
            logprobs = per_sample[j:j + n] if per_sample is not None and self.logprobs[i] is not None else None
            results.append(SampleResult(token_list[j:j + n], logprobs))
            j += n
        return results


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self._generators: dict[str, dict[int, torch.Generator]] = {}    # req_id -> seq_index -> generator

    def forget(self, req_ids) -> None:
        """The requests ended: their seeded generators go."""
        for req_id in req_ids:
            self._generators.pop(req_id, None)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 grammar: GrammarBitmask | None = None) -> list[SampleResult]:
        """logits [N, V], row i the last position of rows[i]; one result of rows[i].num_samples tokens per row.
        grammar: the structured-output rows' token bitmask (applied after the other masks)."""
        return self.draw(logits, rows, grammar).results()

    @torch.inference_mode()
    def draw(self, logits: torch.Tensor, rows: list[SamplingRow],
             grammar: GrammarBitmask | None = None) -> SampledTokens:
        """As __call__, the tokens left on the device (nothing here waits for it)."""
        params = [row.params for row in rows]
        num_samples = [row.num_samples for row in rows]
        if grammar is None and all(map(is_plain_greedy, {id(p): p for p in params}.values())):
            return SampledTokens(logits.argmax(dim=-1), num_samples)
        logits = logits.to(torch.float32, copy=True)     # processed in place below
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
        if any(p.masks_logits for p in params):
            logits = apply_token_constraints(logits, rows)
        if grammar is not None:
            apply_grammar_bitmask(logits, grammar)
        logits = self._mask_stop_tokens(logits, rows)
        logits = self._penalize(logits, rows)

        greedy = [p.temperature < SAMPLING_EPS for p in params]
        sample_rows = [i for i, row in enumerate(rows) for _ in range(row.num_samples)]
        index = staged(sample_rows, logits.device, torch.int64)
        if all(greedy):
            tokens = logits.argmax(dim=-1)[index]
        else:
            tokens = self._draw(logits, rows, greedy, index)
        sampled = SampledTokens(tokens, num_samples)
        if want_logprobs:     # the chosen token's logprob and each sample's top max(logprobs) of the raw ones
            sampled.logprobs = [p.logprobs for p in params]
            sampled.chosen = raw_logprobs[index, tokens]
            sampled.top_values, sampled.top_ids = raw_logprobs[index].topk(max(p.logprobs or 0 for p in params),
                                                                           dim=-1)
        return sampled

    def _mask_stop_tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """min_tokens: EOS (unless ignored) and stop_token_ids cannot be sampled before that many outputs."""
        masked_rows, masked_ids = [], []
        for i, row in enumerate(rows):
            p = row.params
            if row.num_output_tokens < p.min_tokens:
                stop_ids = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                masked_rows += [i] * len(stop_ids)
                masked_ids += stop_ids
        if masked_rows:
            logits[staged(masked_rows, logits.device, torch.int64), staged(masked_ids, logits.device, torch.int64)] \
                = float("-inf")
        return logits

    def _penalize(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        penalized = [i for i, row in enumerate(rows) if row.params.uses_penalties]
        if not penalized:
            return logits
        penalized_rows = [rows[i] for i in penalized]
        params = [row.params for row in penalized_rows]

        def column(name: str) -> torch.Tensor:
            return staged([getattr(p, name) for p in params], logits.device, logits.dtype)

        index = staged(penalized, logits.device, torch.int64)
        logits[index] = apply_penalties(
            logits[index], [r.prompt_token_ids for r in penalized_rows],
            [r.output_token_ids for r in penalized_rows],
            column("presence_penalty"), column("frequency_penalty"), column("repetition_penalty"))
        return logits

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow], greedy: list[bool],
              sample_rows: torch.Tensor) -> torch.Tensor:
        params = [row.params for row in rows]
        device, vocab_size = logits.device, logits.shape[1]
        greedy_tokens = logits.argmax(dim=-1)
        temperature = staged([1.0 if g else p.temperature for g, p in zip(greedy, params)], device, torch.float32)
        scaled = logits / temperature.unsqueeze(1)
        if any(p.top_k or p.top_p < 1 for p in params):
            top_k = staged([min(p.top_k or vocab_size, vocab_size) for p in params], device, torch.int64)
            top_p = staged([p.top_p for p in params], device, torch.float32)
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        if any(p.min_p for p in params):
            probs = apply_min_p(probs, staged([p.min_p for p in params], device, torch.float32))

        probs = probs[sample_rows]
        noise = torch.empty_like(probs).exponential_()
        sample_index = 0
        for i, row in enumerate(rows):
            for k in range(row.num_samples):
                if params[i].seed is not None and not greedy[i]:
                    # a forking row's k-th sample becomes the request's k-th sequence: same generator later
                    generator = self._generator(row, k if row.num_samples > 1 else row.seq_index, device)
                    noise[sample_index].exponential_(generator=generator)
                sample_index += 1
        drawn = (probs / noise).argmax(dim=-1)
        is_greedy = staged(greedy, device, torch.bool)[sample_rows]
        return torch.where(is_greedy, greedy_tokens[sample_rows], drawn)

    def _generator(self, row: SamplingRow, seq_index: int, device) -> torch.Generator:
        generators = self._generators.setdefault(row.req_id, {})
        if seq_index not in generators:
            # hash of an int tuple is stable across runs; distinct streams per sample of one seed
            seed = hash((row.params.seed, seq_index))
            generators[seq_index] = torch.Generator(device).manual_seed(seed)
        return generators[seq_index]
