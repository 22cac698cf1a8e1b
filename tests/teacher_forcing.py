"""Logits at every position of a sequence from one prefill through an engine's paged (possibly fp8) KV cache:
the accuracy probe shared by tests/test_quantization.py and benchmarks/bench_quant.py (no pytest needed)."""
from __future__ import annotations

import torch

from pagedlab import LLM, SamplingParams
from pagedlab.sched_output import NewSeqData, SchedulerOutput

PROBE_SEQ_ID = -1       # no sequence of the engine's has it


def teacher_forced_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """Float32 logits on the CPU at every position of token_ids (in blocks 0, 1, 2, ...)."""
    runner = llm.llm_engine.executor
    blocks = list(range(-(-len(token_ids) // runner.block_size)))
    out = SchedulerOutput(step=0, seq_ids=[PROBE_SEQ_ID], num_scheduled_tokens=[len(token_ids)],
                          num_computed_tokens=[0], num_samples=[0],
                          new_seqs=[NewSeqData(PROBE_SEQ_ID, "teacher-forced", 0, list(token_ids), len(token_ids),
                                               blocks, SamplingParams(max_tokens=1))])
    with torch.inference_mode():
        runner.input_batch.update(out)
        try:
            model_input = runner.upload(runner.prepare(out))
            hidden = runner.forward(model_input.input_ids, model_input.positions, model_input.meta)
            return runner.model.compute_logits(hidden).float().cpu()
        finally:
            runner.input_batch.update(SchedulerOutput(step=0, finished_seq_ids=[PROBE_SEQ_ID]))
