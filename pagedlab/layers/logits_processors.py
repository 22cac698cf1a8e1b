"""What changes a row's logits before sampling, besides penalties: allowed_token_ids, bad_words, logit_bias and a
structured-output grammar's token bitmask (vLLM V1's order: allowed, bad words, bias; the grammar last).

A masked token gets -inf. The bitmask is filled on the host by xgrammar (one bit per token, per row) and applied
where the logits are: xgrammar's kernel on a GPU, its CPU routine on the CPU.
"""
from __future__ import annotations

import torch

from pagedlab.executor.base import ScheduledSeq


def apply_token_constraints(logits: torch.Tensor, rows: list[ScheduledSeq]) -> torch.Tensor:
    """logits [N, V] float32, row i the last position of rows[i]; modified in place."""
    vocab_size = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.request.sampling_params
        if p.allowed_token_ids:
            banned = torch.ones(vocab_size, dtype=torch.bool, device=logits.device)
            banned[[t for t in p.allowed_token_ids if t < vocab_size]] = False
            logits[i].masked_fill_(banned, float("-inf"))
        if p.bad_words_token_ids:
            banned_ids = banned_next_tokens(p.bad_words_token_ids, row.seq.output_token_ids)
            if banned_ids:
                logits[i, banned_ids] = float("-inf")
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab_size]
            logits[i, ids] += torch.tensor([p.logit_bias[t] for t in ids], dtype=logits.dtype, device=logits.device)
    grammar_rows = [i for i, row in enumerate(rows) if row.request.grammar is not None]
    if grammar_rows:
        apply_grammar_bitmask(logits, rows, grammar_rows)
    return logits


def banned_next_tokens(bad_words: list[list[int]], output_ids: list[int]) -> list[int]:
    """The last token of each bad word whose other tokens the output ends with (a one-token word: always)."""
    banned = []
    for word in bad_words:
        prefix = word[:-1]
        if not prefix or (len(output_ids) >= len(prefix) and output_ids[len(output_ids) - len(prefix):] == prefix):
            banned.append(word[-1])
    return banned


_batch_matcher = None


def apply_grammar_bitmask(logits: torch.Tensor, rows: list[ScheduledSeq], grammar_rows: list[int]) -> None:
    """One multithreaded xgrammar call fills the rows' bitmasks on the host; one kernel applies them."""
    global _batch_matcher
    import xgrammar as xgr

    matchers, masked = [], []
    for i in grammar_rows:
        matcher = rows[i].request.grammar.matcher_for(rows[i])
        if not matcher.is_terminated():     # done (ignore_eos runs on past the grammar's end): nothing to mask
            matchers.append(matcher)
            masked.append(i)
    if not masked:
        return
    if _batch_matcher is None:
        _batch_matcher = xgr.BatchGrammarMatcher()
    bitmask = xgr.allocate_token_bitmask(len(rows), logits.shape[1])      # all allowed
    _batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, masked)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=masked)


def accept_grammar_tokens(rows: list[ScheduledSeq], tokens: list[int]) -> None:
    """Advance each grammar row's matchers by the tokens drawn for it (a forking row: sample k -> sequence k), in
    one xgrammar call."""
    import xgrammar as xgr

    matchers, accepted, j = [], [], 0
    for row in rows:
        grammar = row.request.grammar
        for k in range(row.num_samples):
            if grammar is not None:
                matcher = grammar.matcher_after(row, k)
                if not matcher.is_terminated():
                    matchers.append(matcher)
                    accepted.append(tokens[j])
            j += 1
    if matchers and not all(xgr.BatchGrammarMatcher.batch_accept_token(matchers, accepted)):
        raise RuntimeError("a token was sampled outside its grammar")
