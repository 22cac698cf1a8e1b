"""The transformers baselines, on the same weights: `generate` in left-padded static batches (the best of a
batch-size sweep) and `generate_batch`, transformers' own continuous batching."""
from __future__ import annotations

import time

from pagedlab.entrypoints.bench.common import free_memory, gib, log, sync
from pagedlab.entrypoints.bench.shapes import PAD_ID


def hf_static_batch(model, batch, device) -> tuple[float, int, int, int]:
    """One left-padded static batch through generate; (seconds, useful output tokens, real KV tokens, KV slots)."""
    import torch
    prompts = [p for p, _ in batch]
    new = max(o for _, o in batch)
    width = max(map(len, prompts))
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=PAD_ID)
    sync(device)
    seconds = time.perf_counter() - t
    produced = out.shape[1] - width
    useful = sum(min(o, produced) for _, o in batch)
    real = sum(len(p) + min(o, produced) for p, o in batch)
    return seconds, useful, real, len(batch) * (width + produced)


def run_hf_generate(model, work, batch_sizes: list[int], device) -> dict:
    import torch
    hf_static_batch(model, [(work[0][0][:16], 4), (work[1][0][:8], 4)], device)     # warm-up
    probes = {}
    best = None
    for b in batch_sizes:
        if b > len(work) and probes:
            continue
        batch = work[:b]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds, useful, real, slots = hf_static_batch(model, batch, device)
        except torch.cuda.OutOfMemoryError as exc:
            probes[b] = {"error": f"OOM: {str(exc)[:200]}"}
            free_memory()
            continue
        probe = {"requests": len(batch), "wall_s": seconds, "output_tokens_per_s": useful / seconds,
                 "kv_utilization": real / slots}
        if device.type == "cuda":
            probe["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
        probes[b] = probe
        log(f"  generate batch {b}: {probe['output_tokens_per_s']:.0f} output tok/s (first batch)")
        if best is None or probe["output_tokens_per_s"] > probes[best]["output_tokens_per_s"]:
            best = b
    if best is None:
        return {"error": "every batch size failed", "probes": probes}
    # the whole workload at the best batch size (its first batch is the probe, already timed)
    first = probes[best]
    total_s, useful_total = first["wall_s"], first["output_tokens_per_s"] * first["wall_s"]
    utilizations = [first["kv_utilization"]]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for start in range(best, len(work), best):
        seconds, useful, real, slots = hf_static_batch(model, work[start:start + best], device)
        total_s += seconds
        useful_total += useful
        utilizations.append(real / slots)
    result = {"best_batch_size": best, "wall_s": total_s, "generated_tokens": int(round(useful_total)),
              "batches": len(utilizations), "kv_utilization_mean": sum(utilizations) / len(utilizations),
              "probes": {str(k): v for k, v in probes.items()}}
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = max(first.get("peak_gpu_memory_gib") or 0,
                                            gib(torch.cuda.max_memory_allocated(device)) or 0)
    return result


def run_hf_generate_batch(model, work, device) -> dict:
    """transformers' continuous batching. Its warm-up (CUDA graph capture) happens inside generate_batch before
    the requests are added; the timed part starts at that point (found by wrapping the manager's add_request)."""
    import torch
    from transformers import GenerationConfig

    marks: dict[str, float] = {}
    patched = []
    try:
        from transformers.generation.continuous_batching import ContinuousBatchingManager as manager_cls
    except ImportError:
        manager_cls = None
    if manager_cls is not None:
        for name in ("add_request", "add_requests"):
            fn = getattr(manager_cls, name, None)
            if fn is None:
                continue

            def marked(self, *a, _fn=fn, **k):
                marks.setdefault("start", time.perf_counter())
                return _fn(self, *a, **k)
            setattr(manager_cls, name, marked)
            patched.append((name, fn))
    outputs = set(o for _, o in work)
    config = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    inputs = [p for p, _ in work]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        sync(device)
        t0 = time.perf_counter()
        results = model.generate_batch(inputs, generation_config=config, progress_bar=False)
        sync(device)
        t1 = time.perf_counter()
    finally:
        for name, fn in patched:
            setattr(manager_cls, name, fn)
    gen = [len(r.generated_tokens) for r in results.values()]
    start = marks.get("start", t0)
    useful = sum(min(g, o) for g, (_, o) in zip(gen, work)) if len(outputs) > 1 else sum(gen)
    result = {"wall_s": t1 - start, "wall_with_warmup_s": t1 - t0, "warmup_s": start - t0,
              "generated_tokens": useful, "results": len(results), "timed_from": "first add_request" if marks else
              "call start (add_request not found: includes warm-up)",
              "generated_len_min": min(gen, default=0), "generated_len_max": max(gen, default=0)}
    if len(outputs) > 1:
        result["note"] = ("generate_batch takes one max_new_tokens: every request generated the longest output; "
                          "only each request's own output length counts")
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = gib(torch.cuda.max_memory_allocated(device))
        result["peak_gpu_reserved_gib"] = gib(torch.cuda.max_memory_reserved(device))
    return result

