"""Throughput cost of structured outputs: a batch of requests decoding under a JSON schema (xgrammar's bitmask in
the sampler) against the same batch unconstrained, side by side in one process, medians of --repeats runs.

    PYTHONPATH=. python benchmarks/bench_structured.py --device cpu --out benchmarks/results   # the tiny chat model
    PYTHONPATH=. python benchmarks/bench_structured.py --model DIR --device cuda --dtype bfloat16 --out out/structured

Every request generates exactly --output-len tokens (ignore_eos; a finished grammar stops masking), so both runs
do the same work but the masks. Writes structured_<device>.json naming the device.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a local HF directory with a tokenizer (default: a tiny chat model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from pagedlab import LLM, SamplingParams, StructuredOutputsParams

    model = args.model
    if model is None:
        from tests.server_fixtures import build_chat_model
        model = build_chat_model(tempfile.mkdtemp(prefix="tiny-chat-"))
    llm = LLM(model, device=args.device, dtype=args.dtype, max_num_seqs=args.batch)
    prompts = [f"Request {i}: describe a person as JSON." for i in range(args.batch)]

    def run(structured: bool) -> float:
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA) if structured else None)
                  for i in range(args.batch)]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outputs)
        return args.batch * args.output_len / elapsed

    run(True)       # warm-up: compiles the grammar (then cached) and the kernels
    run(False)
    plain, constrained = [], []
    for _ in range(args.repeats):       # interleaved, so drift hits both alike
        plain.append(run(False))
        constrained.append(run(True))
    result = {"device": device_name(args.device), "model": args.model or "tiny chat model (tests/server_fixtures)",
              "batch": args.batch, "output_len": args.output_len, "repeats": args.repeats,
              "tokens_per_s_unconstrained": statistics.median(plain),
              "tokens_per_s_json_schema": statistics.median(constrained)}
    result["cost"] = 1 - result["tokens_per_s_json_schema"] / result["tokens_per_s_unconstrained"]
    result["load_average_1min"] = os.getloadavg()[0]     # a shared machine's figure is only as good as its quiet
    result["command"] = " ".join(["python", *sys.argv])
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"structured_{args.device.split(':')[0]}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
