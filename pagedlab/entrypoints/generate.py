"""`pagedlab generate`: offline generation from the command line."""
from __future__ import annotations

import argparse
import json

from pagedlab.engine.arg_utils import add_engine_args, engine_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_args(p, "generate")


def run(args: argparse.Namespace) -> int:
    from pagedlab import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    for output in llm.generate(args.prompts, params, use_tqdm=False):
        if args.json:
            print(json.dumps({"prompt": output.prompt, "outputs": [c.text for c in output.outputs],
                              "error": output.error}))
        else:
            for c in output.outputs:
                print(f"{output.prompt!r} -> {c.text!r}")
    return 0
