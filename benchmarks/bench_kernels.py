"""Check and benchmark the paged KV-cache kernels (pagedlab.kernels) on a GPU.

    PYTHONPATH=. python benchmarks/bench_kernels.py --out DIR               # an H100: about 2 minutes
    PYTHONPATH=. python benchmarks/bench_kernels.py --out DIR --cpu-smoke   # tiny shapes, Triton interpreter

Sections (each one's failure is recorded and the rest still run):
  correctness   Triton vs the torch references in bf16/fp16/fp8 (max relative error), head dims 64..256
  roofline      device-to-device copy bandwidth (bytes read + written) and bf16 matmul TFLOP/s
  decode        B=64, Hq=32, Hkv=8, D=128, bf16, block_size 16, contexts 1k/4k/8k: median time, bandwidth
                on the KV bytes and its ratio to the copy bandwidth (target >= 0.8), and a num_splits sweep;
                B=4 at 8k with the chosen split count vs none
  paging        the same decode with one contiguous block per sequence: paged / contiguous (target <= 1.10)
  block_sizes   decode at ctx 2k for block sizes 1..256 (block_size_sweep.csv)
  baselines     torch SDPA (contiguous KV, enable_gqa) and compiled FlexAttention at the decode shapes
  prefill       prompts from scratch and chunks after a cached prefix: TFLOP/s, next to SDPA causal
Writes DIR/kernels.json and DIR/block_size_sweep.csv and prints a summary table last.
"""
import os
import sys

if "--cpu-smoke" in sys.argv:  # Triton picks the interpreter when it is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from pagedlab import kernels  # noqa: E402
from pagedlab.kernels import reference  # noqa: E402
from benchmarks.common import run_section  # noqa: E402

FP8 = torch.float8_e4m3fn
GPU_SHAPES = dict(batch=64, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, contexts=[1024, 4096, 8192],
                  sweep_context=2048, sweep_block_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256], split_sweep=[1, 2, 4, 8],
                  small_batch=4,
                  prefill=dict(batch=4, prompt=2048, chunk=512, prefix=3584), dtype=torch.bfloat16)
SMOKE_SHAPES = dict(batch=2, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, contexts=[32, 48],
                    sweep_context=32, sweep_block_sizes=[1, 3, 16], split_sweep=[1, 2], small_batch=1,
                    prefill=dict(batch=2, prompt=24, chunk=8, prefix=20), dtype=torch.float16)
TARGET_BANDWIDTH_RATIO = 0.8
TARGET_PAGING_OVERHEAD = 1.10


# ---------------------------------------------------------------------------------------------------------------
# Timing and test data


def median_ms(fn, device) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.randn(shape, device=device).to(dtype) for _ in range(2)]


def scattered_block_tables(batch, context, block_size, device):
    """Every sequence's blocks placed at random in the cache, as after a long run of allocations and frees."""
    blocks_per_seq = math.ceil(context / block_size)
    physical = torch.randperm(batch * blocks_per_seq, device=device)
    return physical.view(batch, blocks_per_seq).to(torch.int32)


def rel_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def kv_bytes(batch, context, num_kv_heads, head_dim, dtype) -> int:
    return 2 * batch * context * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------------------------
# Sections


def check_correctness(device, smoke):
    """Max relative error against the references, which compute in fp32 on the same (rounded) inputs."""
    g = torch.Generator(device=device).manual_seed(0)
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
    # (query dtype, cache dtype, head_dim, query heads per kv head, block_size)
    cases = [(torch.bfloat16, torch.bfloat16, 128, 4, 16), (torch.float16, torch.float16, 128, 4, 16),
             (torch.bfloat16, FP8, 128, 4, 16), (torch.float16, FP8, 128, 8, 16),
             (torch.bfloat16, torch.bfloat16, 64, 1, 1), (torch.bfloat16, torch.bfloat16, 80, 8, 3),
             (torch.float16, torch.float16, 96, 2, 256), (torch.bfloat16, torch.bfloat16, 256, 4, 32)]
    prefixes, q_lens = [0, 100, 37, 500, 2048], [300, 64, 1, 130, 1]
    if smoke:  # the interpreter has no bf16 arithmetic; tiny shapes
        cases = [(torch.float16, torch.float16, 16, 2, 3), (torch.float32, FP8, 24, 1, 16)]
        prefixes, q_lens = [0, 9, 20], [12, 5, 1]
    results = []
    for dtype, cache_dtype, head_dim, group, block_size in cases:
        num_kv_heads = 2
        name = f"{str(dtype)[6:]} q, {str(cache_dtype)[6:]} cache, D={head_dim}, group={group}, block={block_size}"
        seq_lens = [p + q for p, q in zip(prefixes, q_lens)]
        tables_width = max(math.ceil(n / block_size) for n in seq_lens)
        num_blocks = len(seq_lens) * tables_width
        block_tables = torch.randperm(num_blocks, device=device).view(len(seq_lens), tables_width).to(torch.int32)
        k_cache, v_cache = (torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                                       device=device).to(cache_dtype) for _ in range(2))
        k_scale, v_scale = (torch.tensor([0.02], device=device), torch.tensor([0.015], device=device)) \
            if cache_dtype == FP8 else (None, None)

        # every position of every sequence goes through write_kv_cache, with padding tokens (slot -1) mixed in
        slots = torch.cat([block_tables[b, torch.arange(n, device=device) // block_size].long() * block_size
                           + torch.arange(n, device=device) % block_size for b, n in enumerate(seq_lens)]
                          + [torch.full((7,), -1, device=device)])
        slots = slots[torch.randperm(len(slots), generator=g, device=device)]
        key = torch.randn(len(slots), num_kv_heads, head_dim, generator=g, device=device, dtype=dtype)
        value = torch.randn(len(slots), num_kv_heads, head_dim, generator=g, device=device, dtype=dtype)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        kernels.write_kv_cache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
        reference.write_kv_cache_ref(key, value, k_ref, v_ref, slots, k_scale, v_scale)
        mismatched = sum((a.view(torch.uint8) != b.view(torch.uint8)).sum().item()
                         for a, b in ((k_cache, k_ref), (v_cache, v_ref)))
        # the interpreter's fp32 -> fp8 rounding is wrong (see tests/test_kernels.py); exact on a GPU
        write_ok = mismatched == 0 or (smoke and cache_dtype == FP8)
        results.append(dict(check="write_kv_cache", case=name, mismatched_elements=mismatched, ok=write_ok))
        k_cache.copy_(k_ref)
        v_cache.copy_(v_ref)

        scale = head_dim ** -0.5
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        query = torch.randn(len(seq_lens), group * num_kv_heads, head_dim, generator=g, device=device, dtype=dtype)
        expected = reference.paged_decode_attention_ref(query.float(), k_cache, v_cache, block_tables, seq_lens_t,
                                                        scale, k_scale, v_scale)
        for num_splits in (None, 7):
            out = torch.full_like(query, float("nan"))
            kernels.paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens_t, scale, k_scale,
                                           v_scale, num_splits=num_splits, out=out)
            err = rel_error(out, expected)
            results.append(dict(check=f"decode splits={num_splits}", case=name, max_rel_error=err,
                                ok=err < tolerance[dtype]))

        query = torch.randn(sum(q_lens), group * num_kv_heads, head_dim, generator=g, device=device, dtype=dtype)
        query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        expected = reference.paged_prefill_attention_ref(query.float(), k_cache, v_cache, block_tables,
                                                         query_start_loc, seq_lens_t, scale, max(q_lens), k_scale,
                                                         v_scale)
        out = torch.full_like(query, float("nan"))
        kernels.paged_prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens_t, scale,
                                        max(q_lens), k_scale, v_scale, out=out)
        err = rel_error(out, expected)
        results.append(dict(check="prefill (mixed batch, cached prefixes)", case=name, max_rel_error=err,
                            ok=err < tolerance[dtype]))

    k_caches = random_cache(64, 16, 2, 128, torch.bfloat16, device)
    v_caches = random_cache(64, 16, 2, 128, FP8, device)
    expected = [c.clone() for c in k_caches + v_caches]
    mapping = torch.tensor([[3, 40], [3, 41], [9, 2], [63, 0]], device=device)
    kernels.copy_blocks(k_caches, v_caches, mapping)
    reference.copy_blocks_ref(expected[:2], expected[2:], mapping)
    ok = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(k_caches + v_caches, expected))
    results.append(dict(check="copy_blocks", case="2 layers, bf16 and fp8 caches", ok=ok))

    pinned = device.type == "cuda"
    cpu_cache = torch.zeros(8, 16, 2, 128, dtype=torch.bfloat16, pin_memory=pinned)
    kernels.swap_blocks(k_caches[0], cpu_cache, torch.tensor([[3, 5], [63, 1]]))  # swap out
    back = torch.zeros_like(k_caches[0])
    kernels.swap_blocks(cpu_cache, back, torch.tensor([[5, 7], [1, 8]]))  # swap in
    if pinned:
        torch.cuda.synchronize()
    ok = torch.equal(back[7], k_caches[0][3]) and torch.equal(back[8], k_caches[0][63])
    results.append(dict(check="swap_blocks", case=f"device -> {'pinned ' if pinned else ''}CPU -> device", ok=ok))
    return results


def measure_roofline(device, smoke):
    numel = 2**20 if smoke else 2**30  # bf16: 2 GiB
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device)
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_ms = median_ms(lambda: a @ b, device)
    return dict(copy_gbps=2 * src.numel() * 2 / copy_ms / 1e6, copy_bytes=2 * src.numel() * 2,
                matmul_tflops=2 * n**3 / matmul_ms / 1e9, matmul_shape=[n, n, n])


def decode_setup(shapes, context, block_size, device, contiguous=False):
    """Query, caches and tables for B sequences of `context` tokens (scattered blocks, or one block each)."""
    batch, num_heads, num_kv_heads, head_dim = (shapes[k] for k in ("batch", "num_heads", "num_kv_heads", "head_dim"))
    if contiguous:
        block_size = context
    num_blocks = batch * math.ceil(context / block_size)
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, shapes["dtype"], device)
    if contiguous:
        block_tables = torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)
    else:
        block_tables = scattered_block_tables(batch, context, block_size, device)
    query = torch.randn(batch, num_heads, head_dim, device=device, dtype=shapes["dtype"])
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return dict(query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens,
                scale=head_dim ** -0.5)


def time_decode(setup, device, num_splits=None) -> float:
    args = (setup["query"], setup["k_cache"], setup["v_cache"], setup["block_tables"], setup["seq_lens"],
            setup["scale"])
    return median_ms(lambda: kernels.paged_decode_attention(*args, num_splits=num_splits), device)


def chosen_splits(setup, device) -> int:
    batch, block_size = setup["query"].shape[0], setup["k_cache"].shape[1]
    max_context = setup["block_tables"].shape[1] * block_size
    sms = kernels.attention.num_sms(device)
    return kernels.attention.choose_num_splits(batch, setup["k_cache"].shape[2], max_context, sms)


def bench_decode(device, shapes, copy_gbps):
    rows = []
    for context in shapes["contexts"]:
        setup = decode_setup(shapes, context, shapes["block_size"], device)
        nbytes = kv_bytes(shapes["batch"], context, shapes["num_kv_heads"], shapes["head_dim"], shapes["dtype"])
        ms = time_decode(setup, device)
        split_sweep = {n: time_decode(setup, device, n) * 1e3 for n in shapes["split_sweep"]}
        gbps = nbytes / ms / 1e6
        rows.append(dict(context=context, num_splits=chosen_splits(setup, device), time_us=ms * 1e3,
                         kv_bytes=nbytes, kv_gbps=gbps, ratio_to_copy=gbps / copy_gbps if copy_gbps else None,
                         time_us_by_num_splits=split_sweep))
        del setup
    return rows


def bench_small_batch_decode(device, shapes, copy_gbps):
    """Where split-KV matters: too few sequences x KV heads to fill the SMs without splitting the context."""
    small = dict(shapes, batch=shapes["small_batch"])
    context = shapes["contexts"][-1]
    setup = decode_setup(small, context, shapes["block_size"], device)
    nbytes = kv_bytes(small["batch"], context, small["num_kv_heads"], small["head_dim"], small["dtype"])
    ms, unsplit_ms = time_decode(setup, device), time_decode(setup, device, num_splits=1)
    gbps = nbytes / ms / 1e6
    return dict(batch=small["batch"], context=context, num_splits=chosen_splits(setup, device), time_us=ms * 1e3,
                unsplit_time_us=unsplit_ms * 1e3, kv_gbps=gbps, ratio_to_copy=gbps / copy_gbps if copy_gbps else None)


def bench_paging_overhead(device, shapes, decode_rows):
    rows = []
    for row in decode_rows:
        setup = decode_setup(shapes, row["context"], None, device, contiguous=True)
        contiguous_us = time_decode(setup, device) * 1e3
        rows.append(dict(context=row["context"], paged_block16_us=row["time_us"], contiguous_us=contiguous_us,
                         paged_over_contiguous=row["time_us"] / contiguous_us))
        del setup
    return rows


def bench_block_sizes(device, shapes, copy_gbps, out_dir):
    rows = []
    context = shapes["sweep_context"]
    nbytes = kv_bytes(shapes["batch"], context, shapes["num_kv_heads"], shapes["head_dim"], shapes["dtype"])
    for block_size in shapes["sweep_block_sizes"]:
        setup = decode_setup(shapes, context, block_size, device)
        ms = time_decode(setup, device)
        gbps = nbytes / ms / 1e6
        rows.append(dict(block_size=block_size, context=context, batch=shapes["batch"],
                         num_splits=chosen_splits(setup, device), time_us=round(ms * 1e3, 2),
                         kv_gbps=round(gbps, 1), ratio_to_copy=round(gbps / copy_gbps, 3) if copy_gbps else None))
        del setup
    with open(out_dir / "block_size_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def bench_baselines(device, shapes, smoke):
    """SDPA and FlexAttention on contiguous [B, H, ctx, D] K/V: no paging, the kernels PyTorch ships."""
    from torch.nn.attention.flex_attention import flex_attention
    flex = flex_attention if smoke else torch.compile(flex_attention, dynamic=False)
    batch, num_heads, num_kv_heads, head_dim = (shapes[k] for k in ("batch", "num_heads", "num_kv_heads", "head_dim"))
    rows = []
    for context in shapes["contexts"]:
        q = torch.randn(batch, num_heads, 1, head_dim, device=device, dtype=shapes["dtype"])
        k, v = (torch.randn(batch, num_kv_heads, context, head_dim, device=device, dtype=shapes["dtype"])
                for _ in range(2))
        row = dict(context=context, sdpa_us=median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                                      device) * 1e3)
        try:
            flex(q, k, v, enable_gqa=True)
            row["flex_us"] = median_ms(lambda: flex(q, k, v, enable_gqa=True), device) * 1e3
        except Exception as e:  # FlexAttention's support for decode shapes varies by version
            row["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        # the same numbers through the paged kernel, on this contiguous data (one block per sequence)
        cache_k = k.transpose(1, 2).contiguous()  # [B, ctx, Hkv, D]: block b is sequence b
        cache_v = v.transpose(1, 2).contiguous()
        tables = torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        ours = kernels.paged_decode_attention(q[:, :, 0], cache_k, cache_v, tables, seq_lens, head_dim ** -0.5)
        sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)[:, :, 0]
        row["paged_vs_sdpa_max_rel_error"] = rel_error(ours, sdpa)
        rows.append(row)
    return rows


def bench_prefill(device, shapes, matmul_tflops):
    """Prompts from scratch (vs SDPA causal on contiguous K/V) and chunks after a cached prefix."""
    p = shapes["prefill"]
    num_heads, num_kv_heads, head_dim, dtype = (shapes[k] for k in ("num_heads", "num_kv_heads", "head_dim", "dtype"))
    block_size, batch = shapes["block_size"], p["batch"]
    rows = []
    for name, prefix, q_len in (("prompt", 0, p["prompt"]), ("chunk after prefix", p["prefix"], p["chunk"])):
        context = prefix + q_len
        k_cache, v_cache = random_cache(batch * math.ceil(context / block_size), block_size, num_kv_heads, head_dim,
                                        dtype, device)
        tables = scattered_block_tables(batch, context, block_size, device)
        query = torch.randn(batch * q_len, num_heads, head_dim, device=device, dtype=dtype)
        query_start_loc = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device)
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        ms = median_ms(lambda: kernels.paged_prefill_attention(query, k_cache, v_cache, tables, query_start_loc,
                                                               seq_lens, head_dim ** -0.5, q_len), device)
        attended = batch * sum(prefix + i + 1 for i in range(q_len))  # (query, key) pairs under the causal mask
        flops = 4 * attended * num_heads * head_dim  # QK^T and PV, 2 flops per multiply-add
        row = dict(case=name, batch=batch, prefix=prefix, new_tokens=q_len, time_us=ms * 1e3,
                   tflops=flops / ms / 1e9)
        row["fraction_of_matmul"] = row["tflops"] / matmul_tflops if matmul_tflops else None
        if prefix == 0:
            q = query.view(batch, q_len, num_heads, head_dim).transpose(1, 2)
            k, v = (torch.randn(batch, num_kv_heads, q_len, head_dim, device=device, dtype=dtype) for _ in range(2))
            sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                device)
            row["sdpa_causal_us"] = sdpa_ms * 1e3
        rows.append(row)
        del k_cache, v_cache
    return rows


# ---------------------------------------------------------------------------------------------------------------


def section_ok(value) -> bool:
    return not (isinstance(value, dict) and "error" in value)


def print_summary(results):
    print("\n== correctness (max relative error vs the fp32 references) ==")
    if section_ok(results.get("correctness")):
        for r in results["correctness"]:
            err = f"{r['max_rel_error']:.2e}" if "max_rel_error" in r else f"{r.get('mismatched_elements', '')}"
            print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['check']:<40} {r['case']:<55} {err}")
    roof = results.get("roofline", {})
    if section_ok(roof):
        print(f"\n== roofline: copy {roof['copy_gbps']:.0f} GB/s, bf16 matmul {roof['matmul_tflops']:.0f} TFLOP/s ==")
    if section_ok(results.get("decode")):
        print("\n== decode (B={batch}, Hq={num_heads}, Hkv={num_kv_heads}, D={head_dim}, block 16) ==".format(
            **results["shapes"]))
        paging = {r["context"]: r for r in results["paging"]} if section_ok(results.get("paging")) else {}
        base = {r["context"]: r for r in results["baselines"]} if section_ok(results.get("baselines")) else {}
        print(f"  {'ctx':>6} {'splits':>6} {'us':>9} {'GB/s':>7} {'of copy':>8} {'paged/contig':>13} "
              f"{'sdpa us':>9} {'flex us':>9}")
        for r in results["decode"]:
            ratio = f"{r['ratio_to_copy']:.2f}" if r["ratio_to_copy"] else "-"
            paged = paging.get(r["context"], {}).get("paged_over_contiguous")
            b = base.get(r["context"], {})
            print(f"  {r['context']:>6} {r['num_splits']:>6} {r['time_us']:>9.1f} {r['kv_gbps']:>7.0f} {ratio:>8} "
                  f"{paged if paged is None else round(paged, 3)!s:>13} {b.get('sdpa_us', float('nan')):>9.1f} "
                  f"{b.get('flex_us', float('nan')):>9.1f}")
        print(f"  targets: >= {TARGET_BANDWIDTH_RATIO} of copy bandwidth, paged/contiguous <= {TARGET_PAGING_OVERHEAD}")
    small = results.get("small_batch_decode")
    if section_ok(small):
        print(f"  B={small['batch']} ctx {small['context']}: {small['num_splits']} splits {small['time_us']:.1f} us "
              f"({small['ratio_to_copy'] or 0:.2f} of copy), unsplit {small['unsplit_time_us']:.1f} us")
    if section_ok(results.get("block_sizes")):
        print("\n== block size sweep (ctx {}) ==".format(results["shapes"]["sweep_context"]))
        print("  " + "  ".join(f"{r['block_size']}: {r['time_us']:.0f} us" for r in results["block_sizes"]))
    if section_ok(results.get("prefill")):
        print("\n== prefill ==")
        for r in results["prefill"]:
            sdpa = f", SDPA causal {r['sdpa_causal_us']:.0f} us" if "sdpa_causal_us" in r else ""
            print(f"  {r['case']:<20} B={r['batch']} new={r['new_tokens']} prefix={r['prefix']}: "
                  f"{r['time_us']:.0f} us, {r['tflops']:.0f} TFLOP/s{sdpa}")
    failed = [name for name, value in results.items() if not section_ok(value)]
    print(f"\nsections failed: {failed or 'none'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for kernels.json and block_size_sweep.csv")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU through Triton's interpreter: checks the script, not the GPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke to check the script on the CPU")
    device = torch.device("cpu" if smoke else "cuda")
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    torch.manual_seed(0)

    results = dict(
        command=" ".join([f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}", "python", *sys.argv]),
        gpu=torch.cuda.get_device_name() if not smoke else "cpu (Triton interpreter)",
        sms=kernels.attention.num_sms(device), torch=torch.__version__, triton=triton.__version__,
        shapes={k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in shapes.items()},
    )
    started = time.perf_counter()
    run_section(results, "correctness", lambda: check_correctness(device, smoke))
    roof = run_section(results, "roofline", lambda: measure_roofline(device, smoke))
    copy_gbps = roof.get("copy_gbps")
    decode_rows = run_section(results, "decode", lambda: bench_decode(device, shapes, copy_gbps))
    run_section(results, "small_batch_decode", lambda: bench_small_batch_decode(device, shapes, copy_gbps))
    if section_ok(decode_rows):
        run_section(results, "paging", lambda: bench_paging_overhead(device, shapes, decode_rows))
    run_section(results, "block_sizes", lambda: bench_block_sizes(device, shapes, copy_gbps, args.out))
    run_section(results, "baselines", lambda: bench_baselines(device, shapes, smoke))
    run_section(results, "prefill", lambda: bench_prefill(device, shapes, roof.get("matmul_tflops")))
    results["seconds"] = time.perf_counter() - started

    (args.out / "kernels.json").write_text(json.dumps(results, indent=2, default=str))
    print_summary(results)
    checks_ok = section_ok(results["correctness"]) and all(r["ok"] for r in results["correctness"])
    sys.exit(0 if checks_ok and all(section_ok(v) for v in results.values()) else 1)


if __name__ == "__main__":
    main()
