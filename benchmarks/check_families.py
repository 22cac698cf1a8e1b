"""The newer families and the real model on the GPU: bf16 through the Triton kernels and CUDA graphs, greedy tokens vs
transformers' fp32 `generate`, and a mixture of experts' throughput next to its dense equivalent.

Every family runs on random weights (a mid-size config per family, 4 layers); SmolLM2-135M-Instruct runs from its
GGUF (`--gguf`) as chat. Where pagedlab's greedy tokens leave transformers' fp32 ones, the first differing position
is scored on transformers' fp32 logits, teacher-forced on pagedlab's tokens: `reference_logit_gap` is how far
pagedlab's token is below the top one (a near-tie when small). transformers' own bf16 run is the yardstick: how many
of its sequences keep to its fp32 ones.

Throughput: Mixtral-8x7B's layer dims (hidden 4096, 8 experts of 14336, top 2; 32 / 8 heads) with 2 layers, and the
dense model of the same active parameters per token (one MLP of 2 x 14336), random bf16 weights; 256 requests of 256
prompt + 128 output tokens, ignore_eos; median of 3 runs after a warm-up.

    python benchmarks/check_families.py --gguf PATH --out DIR     # writes DIR/families_check.json
    python benchmarks/check_families.py --smoke                   # tiny, on the CPU: the script's own test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import run_section  # noqa: E402

BASE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, initializer_range=0.05,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
# name -> (config class, model class, overrides of BASE)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral-window64": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=64)),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        original_max_position_embeddings=256, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
            original_max_position_embeddings=256))),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=64, query_pre_attn_scalar=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=64, query_pre_attn_scalar=32,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, sliding_window=None)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)),
}
PROMPT_LENGTHS = [5, 17, 64, 100, 200, 3, 33, 150]
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 3?", "Say hello in Spanish.",
             "What do bees make?", "Which planet is closest to the sun?", "Give me a synonym for happy.",
             "How many legs does a spider have?"]


def hf_generate(model, prompts, new_tokens, eos=None):
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs


def compare(hf_fp32, prompts, ours, reference_tokens, hf_bf16_tokens) -> dict:
    """Greedy agreement, and each mismatch's first position scored on the fp32 reference's logits."""
    mismatches = []
    for i, (a, b) in enumerate(zip(ours, reference_tokens)):
        if a == b:
            continue
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if j == min(len(a), len(b)):     # one stopped at EOS earlier
            mismatches.append({"prompt": i, "position": j, "note": "lengths differ (EOS)"})
            continue
        with torch.no_grad():
            ids = torch.tensor([prompts[i] + a[:j]], device=hf_fp32.device)
            row = hf_fp32(ids).logits[0, -1].float()
        mismatches.append({"prompt": i, "position": j, "pagedlab": a[j], "transformers": b[j],
                           "reference_logit_gap": float(row.max() - row[a[j]])})
    return {"sequences": len(prompts), "greedy_equal_to_transformers_fp32": sum(a == b for a, b in
                                                                                zip(ours, reference_tokens)),
            "transformers_bf16_equal_to_its_fp32": sum(a == b for a, b in zip(hf_bf16_tokens, reference_tokens)),
            "mismatches": mismatches,
            "near_ties_only": all(m.get("reference_logit_gap", 0.0) < 0.1 for m in mismatches)}


def check_family(name: str, device: str, dtype: str, new_tokens: int, base: dict) -> dict:
    import transformers
    from transformers import GenerationConfig

    from pagedlab import LLM, SamplingParams

    config_name, model_name, overrides = FAMILIES[name]
    rope = overrides.get("rope_parameters", {})
    if rope.get("rope_type") == "longrope":     # one short and one long factor per rotated frequency
        pairs = int(base["head_dim"] * rope["partial_rotary_factor"]) // 2
        overrides = dict(overrides, rope_parameters=dict(rope, short_factor=[1.0 + 0.1 * i for i in range(pairs)],
                                                         long_factor=[2.0 + 0.5 * i for i in range(pairs)]))
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**base, **overrides})
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=None, pad_token_id=0)
    directory = tempfile.mkdtemp(prefix=f"pagedlab-{name}-")
    model.save_pretrained(directory)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, base["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    hf32 = model.to(device)
    reference = hf_generate(hf32, prompts, new_tokens)
    hf16 = getattr(transformers, model_name).from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    hf16.generation_config.eos_token_id = None
    yardstick = hf_generate(hf16, prompts, new_tokens)
    del hf16
    llm = LLM(directory, dtype=dtype, device=device, max_model_len=512, num_gpu_blocks_override=512, swap_space=0.05,
              max_num_seqs=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    result = compare(hf32, prompts, ours, reference, yardstick)
    result["cuda_graph_batch_sizes"] = list(getattr(llm.llm_engine.executor, "graph_batch_sizes", []))
    del llm, hf32
    return result


def check_smollm2(path: str, device: str, dtype: str, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedlab import LLM, SamplingParams

    directory, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)) for q in QUESTIONS]
    hf32 = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).to(device).eval()
    reference = hf_generate(hf32, prompts, new_tokens, eos=tokenizer.eos_token_id)
    hf16 = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16).to(device).eval()
    yardstick = hf_generate(hf16, prompts, new_tokens, eos=tokenizer.eos_token_id)
    del hf16
    llm = LLM(path, dtype=dtype, device=device, max_model_len=1024, swap_space=0.05, max_num_seqs=8)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS],
                    SamplingParams(temperature=0, max_tokens=new_tokens), use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    result = compare(hf32, prompts, ours, reference, yardstick)
    result["answers"] = {q: o.outputs[0].text for q, o in zip(QUESTIONS, outs)}
    del llm, hf32
    return result


def moe_throughput(device: str, smoke: bool) -> dict:
    import transformers

    from pagedlab import LLM, SamplingParams

    dims = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    experts, top_k, expert_size = 8, 2, 14336
    num_requests, prompt_len, output_len = 256, 256, 128
    if smoke:
        dims.update(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
        expert_size, num_requests, prompt_len, output_len = 96, 8, 16, 8
    shapes = {
        "mixtral_2_layers": ("MixtralConfig", "MixtralForCausalLM", dict(
            dims, intermediate_size=expert_size, num_local_experts=experts, num_experts_per_tok=top_k,
            sliding_window=None)),
        "dense_same_active_params": ("LlamaConfig", "LlamaForCausalLM", dict(
            dims, intermediate_size=top_k * expert_size)),
    }
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, dims["vocab_size"], (prompt_len,), generator=g).tolist()}
               for _ in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    results = {}
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for name, (config_name, model_name, kwargs) in shapes.items():
        torch.manual_seed(0)
        with torch.device(device):
            model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).to(
                torch.bfloat16 if device == "cuda" else torch.float32)
        directory = tempfile.mkdtemp(prefix=f"pagedlab-{name}-", dir=root)
        model.save_pretrained(directory)
        parameters = sum(p.numel() for p in model.parameters())
        del model
        llm = LLM(directory, dtype="bfloat16" if device == "cuda" else "float32", device=device,
                  max_model_len=prompt_len + output_len, max_num_seqs=256, swap_space=0.1)
        llm.generate(prompts[:16], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        seconds = []
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        results[name] = {"parameters": parameters, "seconds": seconds, "median_seconds": median,
                         "output_tokens_per_s": num_requests * output_len / median,
                         "total_tokens_per_s": num_requests * (prompt_len + output_len) / median}
        del llm
        if device == "cuda":
            torch.cuda.empty_cache()
    results["moe_vs_dense_output_throughput"] = (results["mixtral_2_layers"]["output_tokens_per_s"]
                                                 / results["dense_same_active_params"]["output_tokens_per_s"])
    results["workload"] = dict(num_requests=num_requests, prompt_len=prompt_len, output_len=output_len,
                               experts=experts, top_k=top_k, expert_intermediate=expert_size, **dims)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=None, help="SmolLM2's GGUF file")
    p.add_argument("--out", default="out")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="tiny shapes in fp32 on the CPU")
    p.add_argument("--families", nargs="*", default=list(FAMILIES))
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = "float32" if args.smoke else "bfloat16"
    base = dict(BASE, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                head_dim=16, vocab_size=256) if args.smoke else BASE
    import transformers
    import triton
    results = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "triton": triton.__version__, "dtype": dtype,
               "new_tokens": args.new_tokens, "families": {}}
    for name in args.families:
        run_section(results["families"], name, lambda: check_family(name, device, dtype, args.new_tokens, base))
        print(json.dumps(results["families"][name]), flush=True)
    if args.gguf:
        run_section(results, "smollm2", lambda: check_smollm2(args.gguf, device, dtype, args.new_tokens))
        print(json.dumps(results["smollm2"]), flush=True)
    if not args.skip_throughput:
        run_section(results, "moe_throughput", lambda: moe_throughput(device, args.smoke))
        print(json.dumps(results["moe_throughput"]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "families_check.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
