"""`pagedlab generate`: offline generation from the command line."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for prompts with a local HF checkpoint")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--model", default=None,
                   help="local HF directory or .gguf file (default: the embedded tiny model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_args(p)
    p.set_defaults(func=run)


def add_engine_args(p) -> None:
    """The engine flags shared by generate, serve and bench (vLLM's names)."""
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enable-prefix-caching", action="store_true")
    p.add_argument("--swap-space", type=float, default=4.0)
    p.add_argument("--preemption-mode", choices=["recompute", "swap"], default="recompute")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization", default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--cpu-kv-cache-space", type=float, default=0.5)


ENGINE_ARGS = ("tokenizer", "block_size", "gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
               "enable_prefix_caching", "swap_space", "preemption_mode", "enforce_eager", "dtype", "device",
               "kv_cache_dtype", "quantization", "tensor_parallel_size", "num_gpu_blocks_override",
               "cpu_kv_cache_space")


def engine_kwargs(args) -> dict:
    return {name: getattr(args, name) for name in ENGINE_ARGS}


def run(args) -> int:
    from pagedlab import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens)
    for output in llm.generate(args.prompts, params, use_tqdm=False):
        if args.json:
            print(json.dumps({"prompt": output.prompt, "outputs": [c.text for c in output.outputs],
                              "error": output.error}))
        else:
            for c in output.outputs:
                print(f"{output.prompt!r} -> {c.text!r}")
    return 0
