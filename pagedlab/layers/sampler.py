"""Sampler: logits of the sampling rows -> next tokens, honoring every SamplingParams field (vLLM semantics).

Order: allowed_token_ids, bad_words, logit_bias and a grammar's bitmask (logits_processors), min_tokens masks stop
tokens, penalties, then greedy argmax or temperature -> top-k -> top-p -> min-p ->
a draw. Draws use the exponential race (argmax of probs / Exp(1) noise), so a seeded row consumes exactly one
noise vector per token from its own generator: seeded outputs do not depend on what else is in the batch.
Logprobs are those of the raw model distribution, before any processing; so are prompt logprobs (prompt_logprobs.py).
"""
from __future__ import annotations

import torch

from pagedlab.executor.base import SampleResult, ScheduledSeq
from pagedlab.layers.logits_processors import accept_grammar_tokens, apply_token_constraints
from pagedlab.sequence import Request

SAMPLING_EPS = 1e-5     # temperatures below this are greedy (dividing by them overflows)


def token_counts(token_lists: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[N, V] float: how often each token occurs in each list."""
    width = max(map(len, token_lists), default=0)
    ids = torch.tensor([t + [vocab_size] * (width - len(t)) for t in token_lists], dtype=torch.int64, device=device)
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


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self._generators: dict[str, tuple[Request, dict[int, torch.Generator]]] = {}

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[ScheduledSeq]) -> list[SampleResult]:
        """logits [N, V], row i the last position of rows[i]; one result of rows[i].num_samples tokens per row."""
        params = [row.request.sampling_params for row in rows]
        if all(p.temperature < SAMPLING_EPS and p.logprobs is None and p.n == 1 and not p.uses_penalties
               and not p.min_tokens and not p.masks_logits for p in {id(p): p for p in params}.values()):
            # Plain greedy (the common batch): one argmax where the logits are and one transfer; no float32 copy.
            return [SampleResult([token]) for token in logits.argmax(dim=-1).tolist()]
        logits = logits.to(torch.float32, copy=True)     # processed in place below
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
        if any(p.masks_logits for p in params):
            logits = apply_token_constraints(logits, rows)
        logits = self._mask_stop_tokens(logits, rows)
        logits = self._penalize(logits, rows)

        greedy = [p.temperature < SAMPLING_EPS for p in params]
        sample_rows = [i for i, row in enumerate(rows) for _ in range(row.num_samples)]
        if all(greedy):
            tokens = logits.argmax(dim=-1)[sample_rows]
        else:
            tokens = self._draw(logits, rows, greedy, sample_rows)
        token_list = tokens.tolist()
        if any(p.structured_outputs is not None for p in params):
            accept_grammar_tokens(rows, token_list)

        per_sample_logprobs = self._logprobs(raw_logprobs, params, sample_rows, tokens) if want_logprobs else None
        results, j = [], 0
        for i, row in enumerate(rows):
            n = row.num_samples
            logprobs = per_sample_logprobs[j:j + n] if params[i].logprobs is not None else None
            results.append(SampleResult(token_list[j:j + n], logprobs))
            j += n
        return results

    def _mask_stop_tokens(self, logits: torch.Tensor, rows: list[ScheduledSeq]) -> torch.Tensor:
        """min_tokens: EOS (unless ignored) and stop_token_ids cannot be sampled before that many outputs."""
        for i, row in enumerate(rows):
            p = row.request.sampling_params
            if row.seq.num_output_tokens < p.min_tokens:
                stop_ids = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                logits[i, stop_ids] = float("-inf")
        return logits

    def _penalize(self, logits: torch.Tensor, rows: list[ScheduledSeq]) -> torch.Tensor:
        penalized = [i for i, row in enumerate(rows) if row.request.sampling_params.uses_penalties]
        if not penalized:
            return logits
        seqs = [rows[i].seq for i in penalized]
        params = [rows[i].request.sampling_params for i in penalized]

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=logits.dtype, device=logits.device)

        logits[penalized] = apply_penalties(
            logits[penalized], [s.token_ids[:s.num_prompt_tokens] for s in seqs], [s.output_token_ids for s in seqs],
            column("presence_penalty"), column("frequency_penalty"), column("repetition_penalty"))
        return logits

    def _draw(self, logits: torch.Tensor, rows: list[ScheduledSeq], greedy: list[bool],
              sample_rows: list[int]) -> torch.Tensor:
        params = [row.request.sampling_params for row in rows]
        device, vocab_size = logits.device, logits.shape[1]
        greedy_tokens = logits.argmax(dim=-1)
        temperature = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=device)
        scaled = logits / temperature.unsqueeze(1)
        if any(p.top_k or p.top_p < 1 for p in params):
            top_k = torch.tensor([min(p.top_k or vocab_size, vocab_size) for p in params], device=device)
            top_p = torch.tensor([p.top_p for p in params], device=device)
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        if any(p.min_p for p in params):
            probs = apply_min_p(probs, torch.tensor([p.min_p for p in params], device=device))

        probs = probs[sample_rows]
        noise = torch.empty_like(probs).exponential_()
        self._generators = {rid: entry for rid, entry in self._generators.items() if not entry[0].is_finished}
        sample_index = 0
        for i, row in enumerate(rows):
            for k in range(row.num_samples):
                if params[i].seed is not None and not greedy[i]:
                    # a forking row's k-th sample becomes the request's k-th sequence: same generator later
                    generator = self._generator(row.request, k if row.num_samples > 1 else row.seq_index, device)
                    noise[sample_index].exponential_(generator=generator)
                sample_index += 1
        drawn = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor(greedy, device=device)[sample_rows]
        return torch.where(is_greedy, greedy_tokens[sample_rows], drawn)

    def _generator(self, request: Request, seq_index: int, device) -> torch.Generator:
        entry = self._generators.get(request.request_id)
        if entry is None or entry[0] is not request:
            entry = self._generators[request.request_id] = (request, {})
        generators = entry[1]
        if seq_index not in generators:
            # hash of an int tuple is stable across runs; distinct streams per sample of one seed
            seed = hash((request.sampling_params.seed, seq_index))
            generators[seq_index] = torch.Generator(device).manual_seed(seed)
        return generators[seq_index]

    @staticmethod
    def _logprobs(raw_logprobs: torch.Tensor, params, sample_rows: list[int],
                  tokens: torch.Tensor) -> list[dict[int, float]]:
        """Per sample: {chosen token: logprob} followed by the row's top `logprobs` tokens."""
        rows = torch.tensor(sample_rows, device=raw_logprobs.device)
        chosen = raw_logprobs[rows, tokens].tolist()
        top_values, top_ids = raw_logprobs[rows].topk(max(p.logprobs or 0 for p in params), dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        result = []
        for j, (i, token) in enumerate(zip(sample_rows, tokens.tolist())):
            k = params[i].logprobs or 0
            result.append({token: chosen[j], **dict(zip(top_ids[j][:k], top_values[j][:k]))})
        return result
