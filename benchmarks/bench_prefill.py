"""The Triton prefill/extend kernel against torch SDPA on a GPU (issue 16: >= 0.9x SDPA on Hopper).

    PYTHONPATH=. python benchmarks/bench_prefill.py --out benchmarks/results            # ~2 min on an H200
    PYTHONPATH=. python benchmarks/bench_prefill.py --out benchmarks/results --sweep    # + every tile config
    PYTHONPATH=. python benchmarks/bench_prefill.py --out out/prefill --cpu-smoke        # the script, interpreted

Cases, for the Llama-3.2-1B (head_dim 64) and Llama-3-8B (head_dim 128) attention shapes (32 query heads, 8 KV
heads), bf16, block_size 16, blocks scattered over the cache:
  prompt 4 x 2048      fresh causal prompts; SDPA is_causal on contiguous K/V (GQA)
  chunk 512 @ 8k       a 512-token chunk after an 8192-token cached prefix, batch 1 and 4; SDPA with a lower-right
                       causal mask (torch.nn.attention.bias.causal_lower_right) on contiguous K/V
Each case times the kernel with the launcher's own tiles (prefill_config) and, with --sweep, with each tile config
of SWEEP (checked against the torch reference first), then prints SDPA time / kernel time (>= 0.9 is the target)
and the best config. Writes prefill_<card>.json.
"""
import os
import sys

if "--cpu-smoke" in sys.argv:  # Triton picks the interpreter when it is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedlab.kernels import attention, reference  # noqa: E402

SHAPES = {"llama-3.2-1b": dict(num_heads=32, num_kv_heads=8, head_dim=64),
          "llama-3-8b": dict(num_heads=32, num_kv_heads=8, head_dim=128)}
CASES = [("prompt 4x2048", 4, 0, 2048), ("chunk 512 @ 8k, batch 1", 1, 8192, 512),
         ("chunk 512 @ 8k, batch 4", 4, 8192, 512)]
SMOKE_CASES = [("prompt 2x40", 2, 0, 40), ("chunk 8 @ 50", 1, 50, 8)]
SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
         for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)) if not (m == 64 and w == 8)]
SMOKE_SWEEP = [dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_M=32, BLOCK_N=16)]
TARGET = 0.9


def median_us(fn, device) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[0] * 1e6


def make_case(shape, batch, prefix, q_len, block_size, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hq, hkv, d = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    context = prefix + q_len
    per_seq = math.ceil(context / block_size)
    num_blocks = batch * per_seq
    k_cache, v_cache = (torch.randn(num_blocks, block_size, hkv, d, generator=g).to(device, dtype) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=g).view(batch, per_seq).to(device, torch.int32)
    query = torch.randn(batch * q_len, hq, d, generator=g).to(device, dtype)
    qsl = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    args = (query, k_cache, v_cache, tables, qsl, seq_lens, d ** -0.5, q_len)
    # the same K/V contiguous, for SDPA: [B, H, context, D], KV heads repeated for the chunk case's mask path
    pos = torch.arange(context, device=device)
    blocks = tables.long()[:, pos // block_size]
    k = k_cache[blocks, pos % block_size].transpose(1, 2).contiguous()
    v = v_cache[blocks, pos % block_size].transpose(1, 2).contiguous()
    q = query.view(batch, q_len, hq, d).transpose(1, 2).contiguous()
    return args, q, k, v


def sdpa_call(q, k, v, prefix):
    if prefix == 0:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    from torch.nn.attention.bias import causal_lower_right
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).contiguous(), v.repeat_interleave(group, dim=1).contiguous()
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def rel_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def bench_case(shape_name, case, device, dtype, block_size, sweep):
    name, batch, prefix, q_len = case
    shape = SHAPES[shape_name] if device.type == "cuda" else dict(num_heads=4, num_kv_heads=2, head_dim=16)
    args, q, k, v = make_case(shape, batch, prefix, q_len, block_size, dtype, device)
    attended = batch * sum(prefix + i + 1 for i in range(q_len))
    flops = 4 * attended * shape["num_heads"] * shape["head_dim"]
    sdpa_us = median_us(sdpa_call(q, k, v, prefix), device)
    default = attention.prefill_config(device, shape["head_dim"])
    row = dict(shape=shape_name, case=name, batch=batch, prefix=prefix, new_tokens=q_len, sdpa_us=sdpa_us,
               sdpa_tflops=flops / sdpa_us / 1e6, default_config=default)
    expected = reference.paged_prefill_attention_ref(*args)
    sdpa_out = sdpa_call(q, k, v, prefix)().transpose(1, 2).reshape(expected.shape)
    row["sdpa_max_rel_error"] = rel_error(sdpa_out, expected)      # the same attention: SDPA's inputs are right
    configs = [("default", default)] + [(f"sweep {i}", c) for i, c in enumerate(sweep)]
    tried = []
    for label, config in configs:
        try:
            err = rel_error(attention.paged_prefill_attention(*args, config=dict(config)), expected)
            us = median_us(lambda: attention.paged_prefill_attention(*args, config=dict(config)), device)
        except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is recorded, not fatal
            tried.append(dict(config=config, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        tried.append(dict(config=config, time_us=us, tflops=flops / us / 1e6, max_rel_error=err,
                          ok=err < 2e-2, vs_sdpa=sdpa_us / us))
        if label == "default":
            row.update(time_us=us, tflops=flops / us / 1e6, vs_sdpa=sdpa_us / us, max_rel_error=err)
    good = [t for t in tried if t.get("ok")]
    row["best"] = max(good, key=lambda t: t["vs_sdpa"]) if good else None
    row["configs"] = tried
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="also time every tile config of SWEEP")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in Triton's interpreter")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke to check the script on the CPU")
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float16 if smoke else torch.bfloat16
    card = "cpu" if smoke else torch.cuda.get_device_name()
    sweep = (SMOKE_SWEEP if smoke else SWEEP) if args.sweep else []
    results = dict(command=" ".join(["PYTHONPATH=.", "python", *sys.argv]), card=card, torch=torch.__version__,
                   triton=triton.__version__, dtype=str(dtype), block_size=16, target_vs_sdpa=TARGET, rows=[])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefill_{card.replace('NVIDIA ', '').replace(' ', '_').lower()}.json"
    for shape_name in args.shapes[:1] if smoke else args.shapes:
        for case in SMOKE_CASES if smoke else CASES:
            row = bench_case(shape_name, case, device, dtype, 16, sweep)
            results["rows"].append(row)
            best = row["best"]
            print(f"{shape_name:13s} {row['case']:26s} kernel {row.get('time_us', float('nan')):8.1f} us  SDPA "
                  f"{row['sdpa_us']:8.1f} us  SDPA/kernel {row.get('vs_sdpa', float('nan')):.2f}"
                  + (f"  best {best['vs_sdpa']:.2f} with {best['config']}" if best and sweep else ""), flush=True)
            path.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {path} ({card}); target SDPA/kernel >= {TARGET}")


if __name__ == "__main__":
    main()
