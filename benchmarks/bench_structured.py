"""Throughput cost of structured outputs: a batch of requests decoding under a JSON schema (xgrammar's bitmask in
the sampler) against the same batch unconstrained, side by side in one process, interleaved, medians of --repeats
runs. Target (issue 14): the schema costs at most 10% of the throughput at batch 64 on a GPU.

    # here, on the CPU: the tiny chat model of the tests (the figure in results/structured_cpu.json)
    PYTHONPATH=. python benchmarks/bench_structured.py --device cpu --out benchmarks/results

    # on the GPU: Llama-3.2-1B's shape (random weights) over SmolLM2's real 49k-token vocabulary. The tokenizer
    # travels (3.5 MB), the weights are drawn there. Here, once (after `make models`), into an ignored folder:
    PYTHONPATH=. python benchmarks/bench_structured.py --write-tokenizer .carry/smollm2-tok \
        --tokenizer ~/.cache/pagedlab/models/SmolLM2-135M-Instruct.Q4_1.gguf
    # then carry .carry and the xgrammar wheel (.whl, see the device notes); there:
    PYTHONPATH=. python3 benchmarks/bench_structured.py --device cuda --shape llama-3.2-1b \
        --tokenizer .carry/smollm2-tok --out $OUT
    # or a real model: --model DIR-or-.gguf (SmolLM2's GGUF is 98 MB: it travels xz-compressed, in two halves)

Every request generates exactly --output-len tokens (ignore_eos; a grammar that has finished stops masking), so
both runs do the same work but the masks. Prints the ratio and writes structured_<card>.json (the card named, the
per-repeat figures, the versions, the command).
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
TARGET_COST = 0.10


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from pagedlab.models.gguf_loader import is_gguf, load_gguf_tokenizer
    return load_gguf_tokenizer(path) if is_gguf(path) else AutoTokenizer.from_pretrained(path)


def random_shape_checkpoint(shape: str, tokenizer_path: str, device: str) -> str:
    """A random-weight checkpoint of one of `pagedlab bench`'s shapes, over the given tokenizer's vocabulary (so
    the grammar masks a real vocabulary), drawn on `device`, in a temporary directory with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from pagedlab.entrypoints.bench import SHAPES

    tokenizer = load_tokenizer(tokenizer_path)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    config = LlamaConfig(**{**SHAPES[shape], "vocab_size": len(tokenizer), **ids}, dtype=torch.bfloat16)
    directory = tempfile.mkdtemp(prefix=f"{shape}-random-")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def complete_json(text: str) -> bool:
    """Whether the output starts with a whole JSON document (else the grammar masked every token of it)."""
    try:
        json.JSONDecoder().raw_decode(text.lstrip())
    except json.JSONDecodeError:
        return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", default=None, help="a local HF directory or .gguf file with a tokenizer")
    what.add_argument("--shape", default=None, help="random weights of this `pagedlab bench` shape, with --tokenizer")
    p.add_argument("--tokenizer", default=None, help="with --shape: an HF directory or .gguf holding the tokenizer")
    p.add_argument("--write-tokenizer", metavar="DIR", default=None,
                   help="only save --tokenizer's tokenizer into DIR (small enough to carry to a GPU machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="a directory for structured_<card>.json")
    args = p.parse_args()
    from pagedlab.entrypoints.bench import SHAPES
    if args.shape and args.shape not in SHAPES:
        p.error(f"--shape {args.shape!r} is not one of {', '.join(SHAPES)}")
    if (args.shape or args.write_tokenizer) and not args.tokenizer:
        p.error("--shape and --write-tokenizer need --tokenizer (a real vocabulary for the grammar to mask)")
    if args.write_tokenizer:
        load_tokenizer(args.tokenizer).save_pretrained(args.write_tokenizer)
        print(f"wrote {args.write_tokenizer}")
        return 0

    import torch

    from pagedlab import LLM, SamplingParams, StructuredOutputsParams
    from pagedlab.sim.profiler import card_info, versions

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.shape:
        model, model_name = random_shape_checkpoint(args.shape, args.tokenizer, args.device), \
            f"{args.shape} shape, random weights, tokenizer of {os.path.basename(os.path.normpath(args.tokenizer))}"
    elif args.model:
        model, model_name = args.model, os.path.basename(os.path.normpath(args.model))
    else:
        from tests.server_fixtures import build_chat_model
        model, model_name = build_chat_model(tempfile.mkdtemp(prefix="tiny-chat-")), \
            "tiny chat model (tests/server_fixtures)"
    prompts = [f"Request {i}: describe a person as JSON." for i in range(args.batch)]
    llm = LLM(model, device=args.device, dtype=dtype, max_num_seqs=args.batch, max_model_len=64 + args.output_len)

    def run(structured: bool) -> tuple[float, float]:
        """(output tokens/s, fraction of outputs that are a whole JSON document)"""
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA) if structured else None)
                  for i in range(args.batch)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outputs)
        return args.batch * args.output_len / elapsed, statistics.mean(complete_json(o.outputs[0].text)
                                                                       for o in outputs)

    run(True)       # warm-up: compiles the grammar (then cached), the kernels and the CUDA graphs
    run(False)
    plain, constrained, complete = [], [], []
    for _ in range(args.repeats):       # interleaved, so drift hits both alike
        plain.append(run(False)[0])
        tokens_per_s, whole = run(True)
        constrained.append(tokens_per_s)
        complete.append(whole)
    ratios = [c / u for c, u in zip(constrained, plain)]
    card = card_info(device)
    result = {"device": card["name"], "card": card, "versions": versions(), "model": model_name, "dtype": dtype,
              "batch": args.batch, "output_len": args.output_len, "repeats": args.repeats,
              "tokens_per_s_unconstrained": statistics.median(plain),
              "tokens_per_s_json_schema": statistics.median(constrained),
              "ratio_median_of_pairs": statistics.median(ratios),
              "runs": {"unconstrained": plain, "json_schema": constrained, "ratios": ratios},
              "outputs_complete_json": statistics.mean(complete)}
    result["cost"] = 1 - result["tokens_per_s_json_schema"] / result["tokens_per_s_unconstrained"]
    result["target_cost"] = TARGET_COST
    result["load_average_1min"] = os.getloadavg()[0]     # a shared machine's figure is only as good as its quiet
    result["command"] = " ".join(["python", *sys.argv])
    print(json.dumps(result, indent=2))
    print(f"{card['name']}, batch {args.batch}: JSON schema / unconstrained = {result['ratio_median_of_pairs']:.3f} "
          f"(median of {args.repeats} pairs; cost {result['cost']:.1%} from the medians, target <= "
          f"{TARGET_COST:.0%}{', met' if result['cost'] <= TARGET_COST else ', MISSED'})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"structured_{card['short']}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
