"""The bench's workloads: token-id prompts and output lengths, EOS ignored, as in the vLLM comparisons.

  random    --num-requests (256) prompts of U[--input-len] (64-512) random tokens, --output-len (128) each
  sharegpt  the first --num-requests (1000) requests of data/traces/sharegpt.jsonl (ShareGPT-like lengths)
  long      --num-requests (32) prompts of U[--input-len] (8192-16384) tokens, --output-len (256) each

Each runs at its own max_model_len (2048; long: 20480) unless --max-model-len is given, capped at the model's."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

TRACE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
                     "data", "traces", "sharegpt.jsonl")


@dataclass(frozen=True)
class Workload:
    name: str
    num_requests: int
    input_len: tuple[int, int] | None       # None: lengths from the trace
    output_len: int | None
    max_model_len: int


WORKLOADS = {
    "random": Workload("random", 256, (64, 512), 128, 2048),
    "sharegpt": Workload("sharegpt", 1000, None, None, 2048),
    "long": Workload("long", 32, (8192, 16384), 256, 20480),
}


def resolve(name: str, num_requests: int | None, input_len: list[int] | None, output_len: int | None
            ) -> dict:
    """The workload's settings with the command line's where given; lengths given to a trace workload are an
    error (it has its own)."""
    spec = WORKLOADS[name]
    if spec.input_len is None and (input_len is not None or output_len is not None):
        raise SystemExit(f"--input-len / --output-len do not apply to the {name} workload: its lengths come from "
                         f"{os.path.relpath(TRACE)}; leave them out, or use --workload random")
    return {"workload": name, "num_requests": num_requests or spec.num_requests,
            "input_len": list(input_len or spec.input_len or ()), "output_len": output_len or spec.output_len,
            "max_model_len": spec.max_model_len}


def make_workload(args, vocab_size: int, max_model_len: int, seed: int | None = None
                  ) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output tokens)]: random token ids, lengths as the workload says (`args`: workload,
    num_requests, input_len, output_len, seed). `seed` draws other tokens of the same lengths (a second run that
    the prefix cache cannot serve from the first)."""
    import numpy as np
    rng = np.random.default_rng(args.seed)
    if args.workload == "sharegpt":
        with open(TRACE) as f:
            rows = [json.loads(line) for line in f][:args.num_requests]
        lens = [(r["prompt_len"], r["output_len"]) for r in rows]
    else:
        lo, hi = args.input_len
        lens = [(int(n), args.output_len) for n in rng.integers(lo, hi + 1, args.num_requests)]
    if seed is not None:
        rng = np.random.default_rng([args.seed, seed])
    work = []
    for prompt_len, output_len in lens:
        prompt_len = max(1, min(prompt_len, max_model_len - output_len))
        work.append((rng.integers(3, vocab_size, prompt_len).tolist(), output_len))
    return work


def workload_stats(work) -> dict:
    prompts = [len(p) for p, _ in work]
    outputs = [o for _, o in work]
    return {"num_requests": len(work), "prompt_tokens": sum(prompts), "output_tokens": sum(outputs),
            "prompt_len_min": min(prompts), "prompt_len_mean": sum(prompts) / len(prompts),
            "prompt_len_max": max(prompts), "output_len_min": min(outputs),
            "output_len_mean": sum(outputs) / len(outputs), "output_len_max": max(outputs)}
