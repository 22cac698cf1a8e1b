"""Logits at every position of a sequence from one prefill through an engine's paged (possibly fp8) KV cache:
the accuracy probe shared by tests/test_quantization.py and benchmarks/bench_quant.py (no pytest needed)."""
from __future__ import annotations

import torch

from pagedlab import LLM, SamplingParams
from pagedlab.executor.base import ScheduledSeq
from pagedlab.sequence import Request


class FixedBlocks:
    """The block table of one sequence: blocks 0, 1, 2, ..."""

    def __init__(self, num_blocks: int) -> None:
        self.table = list(range(num_blocks))

    def block_table(self, seq) -> list[int]:
        return self.table


def teacher_forced_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """Float32 logits on the CPU at every position of token_ids."""
    runner = llm.llm_engine.executor
    request = Request("teacher-forced", token_ids, SamplingParams(max_tokens=1))
    scheduled = ScheduledSeq(request, request.seqs[0], 0, len(token_ids),
                             FixedBlocks(-(-len(token_ids) // runner.block_size)))
    with torch.inference_mode():
        model_input = runner.upload(runner.prepare([scheduled]))
        hidden = runner.forward(model_input.input_ids, model_input.positions, model_input.meta)
        return runner.model.compute_logits(hidden).float().cpu()
