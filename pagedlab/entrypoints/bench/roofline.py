"""The roofline bound a workload is held to: the copy bandwidth and matmul rate measured on this GPU now, and the
least time prefill FLOPs and per-step weight + KV reads could take at those rates."""
from __future__ import annotations

from pagedlab.entrypoints.bench.common import free_memory


def measure_ceilings(device) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, measured here and now."""
    import torch
    if device.type != "cuda":
        return {"copy_bytes_per_s": 3.0e12, "matmul_flops_per_s": 790e12, "measured": False,
                "note": "no GPU: the H100 figures of the anchors, for the smoke test only"}
    from triton.testing import do_bench

    n = 1 << 30     # 1 GiB of bf16, twice
    src = torch.randn(n // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    del a, b
    free_memory()
    return {"copy_bytes_per_s": 2 * n / (copy_ms * 1e-3), "matmul_flops_per_s": 2 * 8192 ** 3 / (mm_ms * 1e-3),
            "copy_ms_2GiB": copy_ms, "matmul_ms_8192": mm_ms, "measured": True}


def roofline(work, dims: dict, ceilings: dict, max_num_seqs: int, dtype_bytes: int = 2) -> dict:
    """Lower bound on the workload's time: prefill FLOPs at the matmul rate, then decode steps that each read the
    weights once and every running sequence's KV once at the copy bandwidth (or their FLOPs, if more), with at most
    max_num_seqs sequences decoding at a time in arrival order; each request's first token comes from its prefill."""
    bw, rate = ceilings["copy_bytes_per_s"], ceilings["matmul_flops_per_s"]
    layers, hq, d = dims["layers"], dims["num_heads"], dims["head_dim"]
    kv_per_token = 2 * layers * dims["num_kv_heads"] * d * dtype_bytes
    linear = dims["layer_params"]
    prefill_flops = 0.0
    for prompt, _ in work:
        n = len(prompt)
        prefill_flops += 2 * linear * n + 4 * layers * hq * d * n * (n + 1) / 2 + 2 * dims["lm_head_params"]
    prefill_s = prefill_flops / rate
    weight_bytes = (linear + dims["lm_head_params"]) * dtype_bytes
    # decode: (context, tokens left) of each running sequence
    pending = [(len(p) + 1, o - 1) for p, o in work]
    running, decode_s, steps, bytes_total = [], 0.0, 0, 0.0
    pending.reverse()
    while pending or running:
        while pending and len(running) < max_num_seqs:
            ctx, left = pending.pop()
            if left > 0:
                running.append([ctx, left])
        if not running:
            continue
        kv_bytes = sum(ctx for ctx, _ in running) * kv_per_token
        flops = len(running) * 2 * (linear + dims["lm_head_params"]) + sum(
            4 * layers * hq * d * ctx for ctx, _ in running)
        step_bytes = weight_bytes + kv_bytes
        decode_s += max(step_bytes / bw, flops / rate)
        bytes_total += step_bytes
        steps += 1
        for r in running:
            r[0] += 1
            r[1] -= 1
        running = [r for r in running if r[1] > 0]
    total = prefill_s + decode_s
    out_tokens = sum(o for _, o in work)
    return {"prefill_flops": prefill_flops, "prefill_s": prefill_s, "decode_steps": steps, "decode_s": decode_s,
            "decode_bytes": bytes_total, "weight_bytes_per_step": weight_bytes, "kv_bytes_per_token": kv_per_token,
            "bound_s": total, "output_tokens_per_s": out_tokens / total}

