"""`pagedlab bench --check`: the GPU path against transformers, before anything is timed."""
from __future__ import annotations

import json
import shutil
import tempfile

from pagedlab.entrypoints.bench.common import free_memory, log


def run_checks(device, seed: int = 0) -> dict:
    """A small random Llama on `device`: pagedlab greedy tokens vs transformers (fp32), logits vs a teacher-forced
    transformers fp32 reference (fp32 and bf16; transformers' own bf16 error is the yardstick), and CUDA graphs vs
    enforce_eager (identical greedy tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from pagedlab import LLM, SamplingParams

    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    directory = tempfile.mkdtemp(prefix="pagedlab-check-")
    hf.save_pretrained(directory)
    hf = hf.to(device)
    hf.generation_config.eos_token_id = None     # pagedlab ignores EOS here; transformers must not stop or mask it
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 7, 15, 16, 17, 31, 64, 100, 200, 333, 500]
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]
    new_tokens = [8 + 4 * i for i in range(len(prompts))]   # the batch shrinks through the graph buckets

    with torch.no_grad():
        hf_tokens = []
        for p, k in zip(prompts, new_tokens):
            ids = torch.tensor([p], device=device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, do_sample=False)
            hf_tokens.append(out[0, len(p):].tolist())

    def reference_logits(model, p, toks):
        with torch.no_grad():
            ids = torch.tensor([p + toks[:-1]], device=device)
            return model(ids).logits[0, len(p) - 1:].float()

    def pagedlab_run(dtype: str, eager: bool):
        llm = LLM(directory, dtype=dtype, device=str(device), max_model_len=1024, max_num_seqs=16,
                  num_gpu_blocks_override=1024, enforce_eager=eager, swap_space=0.05)
        runner = llm.llm_engine.executor
        logits: dict[int, list] = {}
        sampler = runner.sampler

        def recording(batch_logits, rows):
            for i, row in enumerate(rows):
                logits.setdefault(row.seq.seq_id, []).append(batch_logits[i].float().cpu())
            return sampler(batch_logits, rows)
        runner.sampler = recording
        params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in new_tokens]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outs]
        per_prompt = [torch.stack(v) for _, v in sorted(logits.items())]     # seq ids follow the prompt order
        graphs = list(runner.graph_batch_sizes)
        del llm, runner
        free_memory()
        return tokens, per_prompt, graphs

    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    result = {"device": str(device)}
    runs = {}
    for dtype in ("float32", "bfloat16"):
        for eager in (False, True):
            runs[(dtype, eager)] = pagedlab_run(dtype, eager)
    hf_bf16 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    for dtype in ("float32", "bfloat16"):
        tokens, logits, graphs = runs[(dtype, False)]
        eager_tokens, eager_logits, _ = runs[(dtype, True)]
        ref = [reference_logits(hf, p, t) for p, t in zip(prompts, tokens)]
        errs = [rel_err(a.to(r.device), r) for a, r in zip(logits, ref)]
        entry = {"graph_batch_sizes": graphs,
                 "greedy_equal_to_transformers": sum(a == b for a, b in zip(tokens, hf_tokens)),
                 "sequences": len(prompts),
                 "max_logits_rel_err_vs_transformers_fp32": max(errs),
                 "graphs_vs_eager_equal_tokens": sum(a == b for a, b in zip(tokens, eager_tokens))}
        # Logits are compared up to each sequence's first differing token (after it the contexts differ); a flip
        # is described by the gap between the two tokens in the reference and in eager mode at that position.
        diffs, flips = [], []
        for i, (a, b) in enumerate(zip(tokens, eager_tokens)):
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a) - 1)
            diffs.append(float((logits[i][:j + 1] - eager_logits[i][:j + 1]).abs().max()))
            if a != b:
                flips.append({"prompt": i, "position": j, "graphs": a[j], "eager": b[j],
                              "reference_logit_gap": float(abs(ref[i][j][a[j]] - ref[i][j][b[j]])),
                              "eager_logit_gap": float(abs(eager_logits[i][j][a[j]] - eager_logits[i][j][b[j]]))})
        entry["graphs_vs_eager_max_abs_logit_diff"] = max(diffs)
        entry["graphs_vs_eager_flips"] = flips
        first_diff = []
        for i, (a, b) in enumerate(zip(tokens, hf_tokens)):
            if a != b:
                j = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
                row = ref[i][j]
                first_diff.append({"prompt": i, "position": j, "pagedlab": a[j], "transformers": b[j],
                                   "reference_logit_gap": float(row.max() - row[a[j]])})
        entry["mismatches"] = first_diff
        if dtype == "bfloat16":
            hf_errs = [rel_err(reference_logits(hf_bf16, p, t), r) for p, t, r in zip(prompts, tokens, ref)]
            entry["transformers_bf16_rel_err_vs_fp32"] = max(hf_errs)
            entry["ok"] = max(errs) <= max(2 * max(hf_errs), 1e-2)
        else:
            # fp32 on both sides (the kernels' dots too): only summation orders differ, so greedy may flip only
            # where the reference's top two are ~tied
            entry["ok"] = max(errs) < 2e-3 and all(d["reference_logit_gap"] < 1e-2 for d in first_diff)
        entry["ok_graphs_vs_eager"] = entry["graphs_vs_eager_equal_tokens"] == len(prompts)
        result[dtype] = entry
        log(f"check {dtype}: {json.dumps(entry)}")
    del hf, hf_bf16
    shutil.rmtree(directory, ignore_errors=True)
    free_memory()
    result["ok"] = all(result[d]["ok"] for d in ("float32", "bfloat16")) and result["float32"]["ok_graphs_vs_eager"]
    return result

