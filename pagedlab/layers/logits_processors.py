"""What changes a row's logits before sampling, besides penalties: allowed_token_ids, bad_words, logit_bias and a
structured-output grammar's token bitmask (vLLM V1's order: allowed, bad words, bias; the grammar last).

A masked token gets -inf. The bitmask is filled on the host by xgrammar (one bit per token, per row; the engine
does that, structured_outputs.fill_bitmask, while the device runs the forward pass) and applied here, where the
logits are: xgrammar's kernel on a GPU, its CPU routine on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedlab.layers.staging import staged


@dataclass(frozen=True)
class GrammarBitmask:
    """Structured outputs' next-token bitmask (xgrammar's int32 layout, one row per sampling row, filled on the
    host by the engine) and the rows it applies to (the others are left as they are)."""
    bitmask: torch.Tensor
    rows: list[int]


def apply_token_constraints(logits: torch.Tensor, rows) -> torch.Tensor:
    """logits [N, V] float32, row i the last position of rows[i] (sampler.SamplingRow); modified in place."""
    vocab_size = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if p.allowed_token_ids:
            banned = torch.ones(vocab_size, dtype=torch.bool, device=logits.device)
            banned[staged([t for t in p.allowed_token_ids if t < vocab_size], logits.device, torch.int64)] = False
            logits[i].masked_fill_(banned, float("-inf"))
        if p.bad_words_token_ids:
            banned_ids = banned_next_tokens(p.bad_words_token_ids, row.output_token_ids)
            if banned_ids:
                logits[i, staged(banned_ids, logits.device, torch.int64)] = float("-inf")
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab_size]
            logits[i, staged(ids, logits.device, torch.int64)] += staged([p.logit_bias[t] for t in ids], logits.device,
                                                                         logits.dtype)
    return logits


def banned_next_tokens(bad_words: list[list[int]], output_ids: list[int]) -> list[int]:
    """The last token of each bad word whose other tokens the output ends with (a one-token word: always)."""
    banned = []
    for word in bad_words:
        prefix = word[:-1]
        if not prefix or (len(output_ids) >= len(prefix) and output_ids[len(output_ids) - len(prefix):] == prefix):
            banned.append(word[-1])
    return banned


def apply_grammar_bitmask(logits: torch.Tensor, grammar: GrammarBitmask) -> None:
    """One kernel applies the bitmask where the logits are (xgrammar's: a GPU kernel, or its CPU routine)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, grammar.bitmask.to(logits.device, non_blocking=True),
                                    indices=grammar.rows)
