"""Quantization on a GPU: weight memory, KV capacity, decode throughput and logit error of each mode, end to end
through pagedlab.LLM.

    PYTHONPATH=. python benchmarks/bench_quant.py --out DIR               # an H100: under 2 minutes
    PYTHONPATH=. python benchmarks/bench_quant.py --out DIR --cpu-smoke   # a tiny model on the CPU

The model has Llama-3.2-1B's shape (16 layers, hidden 2048, 32 query and 8 KV heads of 64, MLP 8192, vocab
128256, tied embeddings) and random weights, written once as a bf16 checkpoint and once as an AWQ checkpoint
(4 bits, group 128, by tests/awq_quantizer.py). Modes:
  bf16         the baseline
  fp8-kv       kv_cache_dtype="fp8" (per-layer scales calibrated at startup)
  fp8          quantization="fp8": e4m3 weights, a scale per output channel; fp8 GEMMs on compute capability 8.9+
  fp8+fp8-kv   both
  awq          the AWQ checkpoint in float16 (AWQ's dtype), through the Triton dequant-GEMM
Each mode is one section (a failure is recorded and the others still run) reporting: weight memory (all of it,
and the linear layers alone), the KV budget at gpu_memory_utilization 0.9 and the blocks it holds, decode
throughput (64 prompts of 128 random tokens, 128 new tokens each, after a warm-up run; decode-only steps), and
teacher-forced logits over 4 random sequences of 128 tokens against bf16's: max abs error, mean relative error
(per position, |error| / |logits|) and top-1 agreement. Random weights make the top-1 token a near tie, so the
relative error is the number to read. Writes DIR/quant.json and prints a summary table last.
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from pagedlab import LLM, SamplingParams
from pagedlab.layers.linear import MergedLinear
from pagedlab.layers.quantization.fp8 import has_fp8_matmul
from benchmarks.common import run_section
from tests.awq_quantizer import write_awq_checkpoint
from tests.teacher_forcing import teacher_forced_logits

LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True,
                  max_position_embeddings=256)
GPU_SETUP = dict(name="Llama-3.2-1B shape", model=LLAMA_3_2_1B, device="cuda", num_prompts=64, prompt_len=128,
                 new_tokens=128, eval_seqs=4, eval_len=128, max_model_len=2048, awq_group_size=128)
SMOKE_SETUP = dict(name="tiny Llama", model=TINY_LLAMA, device="cpu", num_prompts=4, prompt_len=16, new_tokens=8,
                   eval_seqs=2, eval_len=32, max_model_len=128, awq_group_size=32)
INIT_STD = 0.02      # transformers' initializer_range for Llama
MODES = {
    "bf16": dict(dtype="bfloat16"),
    "fp8-kv": dict(dtype="bfloat16", kv_cache_dtype="fp8"),
    "fp8": dict(dtype="bfloat16", quantization="fp8"),
    "fp8+fp8-kv": dict(dtype="bfloat16", quantization="fp8", kv_cache_dtype="fp8"),
    "awq": dict(dtype="float16", quantization="awq"),
}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, prompts and teacher-forced logits


def write_random_llama(shape: dict, directory: Path, device: str) -> str:
    """A bf16 Llama checkpoint of the given shape with N(0, INIT_STD) matrices and unit norms."""
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    config.save_pretrained(directory)
    hidden, head_dim = shape["hidden_size"], shape["head_dim"]
    q_size, kv_size = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (shape["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for i in range(shape["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (hidden,), f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.self_attn.q_proj.weight": (q_size, hidden), f"{layer}.self_attn.k_proj.weight": (kv_size, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_size, hidden), f"{layer}.self_attn.o_proj.weight": (hidden, q_size),
            f"{layer}.mlp.gate_proj.weight": (shape["intermediate_size"], hidden),
            f"{layer}.mlp.up_proj.weight": (shape["intermediate_size"], hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, shape["intermediate_size"]),
        })
    generator = torch.Generator(device).manual_seed(0)
    tensors = {name: (torch.ones(size, device=device) if len(size) == 1 else
                      torch.randn(size, device=device, generator=generator) * INIT_STD).to(torch.bfloat16).cpu()
               for name, size in shapes.items()}
    save_file(tensors, str(directory / "model.safetensors"))
    return str(directory)


def random_token_lists(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (count, length), generator=generator).tolist()



# ---------------------------------------------------------------------------------------------------------------
# One mode


def weight_bytes(model: torch.nn.Module) -> dict:
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)
    linears = [m for m in model.modules() if isinstance(m, MergedLinear)]
    return dict(all=size(chain(model.parameters(), model.buffers())),
                linear_layers=size(chain.from_iterable(chain(m.parameters(), m.buffers()) for m in linears)))


def decode_throughput(llm: LLM, setup: dict, vocab_size: int) -> dict:
    """Generated tokens per second of wall time (engine steps: scheduling, forward, sampling) over the steps that
    only decode, for a batch of requests admitted together."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=setup["new_tokens"], ignore_eos=True)
    for prompt in random_token_lists(setup["num_prompts"], setup["prompt_len"], vocab_size, seed=1):
        engine.add_request({"prompt_token_ids": prompt}, params)
    decode_seconds = decode_tokens = 0
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        step_started = time.perf_counter()
        engine.step()
        if engine.last_step.num_prefill_tokens == 0:
            decode_seconds += time.perf_counter() - step_started
            decode_tokens += engine.last_step.num_generated_tokens
    return dict(decode_tokens_per_s=decode_tokens / decode_seconds, decode_seconds=decode_seconds,
                run_seconds=time.perf_counter() - started, batch=setup["num_prompts"],
                new_tokens=setup["new_tokens"])


def logit_error(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    errors = [ours - theirs for ours, theirs in zip(logits, reference)]
    relative = torch.cat([e.norm(dim=-1) / r.norm(dim=-1) for e, r in zip(errors, reference)])
    agreement = torch.cat([o.argmax(-1) == r.argmax(-1) for o, r in zip(logits, reference)]).float().mean()
    return dict(max_abs=max(e.abs().max().item() for e in errors), mean_relative=relative.mean().item(),
                top1_agreement=agreement.item())


def run_mode(name: str, model_dir: str, setup: dict, eval_sequences: list[list[int]]) -> dict:
    # swap_space: a small CPU swap cache, as nothing is preempted here (pinning the default 4 GiB takes seconds)
    llm = LLM(model_dir, device=setup["device"], gpu_memory_utilization=0.9, max_model_len=setup["max_model_len"],
              max_num_seqs=setup["num_prompts"], swap_space=0.25, **MODES[name])
    runner, budget = llm.llm_engine.executor, llm.llm_engine.kv_budget
    result = dict(settings=MODES[name], weight_bytes=weight_bytes(runner.model),
                  kv_budget={k: v for k, v in budget.items() if isinstance(v, (int, float))},
                  kv_tokens=budget["num_gpu_blocks"] * runner.block_size)
    if runner.attention_layers[0].k_scale is not None:
        result["kv_scales"] = [[layer.k_scale.item(), layer.v_scale.item()] for layer in runner.attention_layers]
    vocab_size = runner.hf_config.vocab_size
    decode_throughput(llm, dict(setup, new_tokens=2), vocab_size)    # a warm-up: compiles prefill-shaped kernels
    result["throughput"] = decode_throughput(llm, setup, vocab_size)
    result["logits"] = [teacher_forced_logits(llm, s) for s in eval_sequences]    # taken out by main
    return result


# ---------------------------------------------------------------------------------------------------------------


def section_ok(value) -> bool:
    return not (isinstance(value, dict) and "error" in value)


def print_summary(results):
    modes = {name: results["modes"].get(name) for name in MODES}
    base = modes["bf16"] if section_ok(modes["bf16"]) else None
    print(f"\n== {results['device']}: {results['setup']['name']}, random weights ==")
    print(f"  {'mode':<11} {'weights GiB':>11} {'linears GiB':>11} {'KV blocks':>10} {'x bf16':>6} "
          f"{'decode tok/s':>12} {'x bf16':>6} {'rel err':>8} {'max abs':>8} {'top-1':>6}")
    for name, r in modes.items():
        if not section_ok(r):
            print(f"  {name:<11} FAILED: {r['error'][:100]}")
            continue
        blocks, tps = r["kv_budget"]["num_gpu_blocks"], r["throughput"]["decode_tokens_per_s"]
        ratio_blocks = blocks / base["kv_budget"]["num_gpu_blocks"] if base else float("nan")
        ratio_tps = tps / base["throughput"]["decode_tokens_per_s"] if base else float("nan")
        none = 0.0 if name == "bf16" else float("nan")      # the baseline, or a mode with no baseline to compare
        err = r.get("logit_error_vs_bf16", dict(mean_relative=none, max_abs=none, top1_agreement=1.0 - none))
        weights = r["weight_bytes"]
        print(f"  {name:<11} {weights['all'] / 2**30:>11.3f} {weights['linear_layers'] / 2**30:>11.3f} {blocks:>10}"
              f" {ratio_blocks:>6.2f} {tps:>12.0f} {ratio_tps:>6.2f} {err['mean_relative']:>8.4f}"
              f" {err['max_abs']:>8.4f} {err['top1_agreement']:>6.3f}")
    failed = [name for name, r in modes.items() if not section_ok(r)]
    if not section_ok(results["checkpoints"]):
        failed.insert(0, "checkpoints")
    print(f"\nsections failed: {failed or 'none'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for quant.json")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a tiny model on the CPU (torch references): checks the script, not the GPU")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke to check the script on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    setup = SMOKE_SETUP if args.cpu_smoke else GPU_SETUP
    device = torch.device(setup["device"])
    results = dict(
        command=" ".join([f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}", "python", *sys.argv]),
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        fp8_matmul=has_fp8_matmul(device), torch=torch.__version__, setup=setup, modes={})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        def write_checkpoints():
            bf16 = write_random_llama(setup["model"], Path(tmp) / "bf16", setup["device"])
            awq = write_awq_checkpoint(bf16, str(Path(tmp) / "awq"), setup["awq_group_size"], device=setup["device"])
            return dict(bf16=bf16, awq=awq)
        checkpoints = run_section(results, "checkpoints", write_checkpoints)
        if section_ok(checkpoints):
            eval_sequences = random_token_lists(setup["eval_seqs"], setup["eval_len"], setup["model"]["vocab_size"],
                                                seed=2)
            reference = None
            for name in MODES:
                model_dir = checkpoints["awq" if name == "awq" else "bf16"]
                result = run_section(results["modes"], name, lambda: run_mode(name, model_dir, setup, eval_sequences))
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()    # or the next mode's memory profile would count this one's as taken
                if not section_ok(result):
                    continue
                logits = result.pop("logits")
                if name == "bf16":
                    reference = logits
                elif reference is not None:
                    result["logit_error_vs_bf16"] = logit_error(logits, reference)
    results["seconds"] = time.perf_counter() - started
    (args.out / "quant.json").write_text(json.dumps(results, indent=2, default=str))
    print_summary(results)
    ok = section_ok(results["checkpoints"]) and all(section_ok(r) for r in results["modes"].values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
