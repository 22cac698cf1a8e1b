"""Kernel warm-up (pagedlab/executor/warmup.py) and the compile guard (kernels/compile_guard.py).

The enumeration is a pure function: it must hold every variant the launchers' own selectors can pick over every
step the scheduler can produce, and the warm-up plan must launch all of them. In Triton's interpreter (no compiler,
so no compile hooks) the guard's variant-key accounting stands in for Triton's cache: after the warm-up, real
engine steps of every kind launch no variant that was not launched already.
"""
from __future__ import annotations

import logging
import os

import pytest

from tests.interpreter import run_triton_cases_in_interpreter
from tests.model_fixtures import tiny_model  # noqa: F401 - fixture

triton = pytest.importorskip("triton")

from pagedlab.executor import warmup  # noqa: E402
from pagedlab.executor.warmup import KernelSpace, KernelVariant  # noqa: E402
from pagedlab.kernels import attention, awq  # noqa: E402
from pagedlab.kernels import compile_guard  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BUCKETS = (1, 2, 4, 8) + tuple(range(16, 256, 16)) + (256,)     # ModelRunner's for max_num_seqs 256
FLAGS = (("SLIDING", False), ("SOFTCAP", False))


def llama_1b(**overrides) -> KernelSpace:
    shape = dict(max_model_len=8192, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
                 graph_batch_sizes=BUCKETS, num_heads=32, num_kv_heads=8, head_dim=64)
    return KernelSpace(**{**shape, **overrides})


def test_kernels_in_interpreter_subprocess():
    run_triton_cases_in_interpreter(__file__)


def test_every_decode_split_count_of_every_batch_and_table_width_is_listed():
    space = llama_1b(graph_batch_sizes=(), max_num_seqs=64, max_model_len=16384)
    variants = warmup.kernel_variants(space)
    seen = set()
    for batch in range(1, space.max_num_seqs + 1):
        for width in space.table_widths:
            splits = attention.decode_num_splits(batch, 8, width, 16, None, space.sms)
            assert KernelVariant("paged_decode", (("NUM_SPLITS", splits),) + FLAGS) in variants, (batch, width)
            if splits > 1:
                assert KernelVariant("decode_merge", (("NUM_SPLITS", splits),)) in variants
            seen.add(splits)
    assert seen == set(range(1, attention.MAX_SPLITS + 1))      # the whole range is met, not a few values
    listed = {dict(v.key)["NUM_SPLITS"] for v in variants if v.kernel == "paged_decode"}
    assert listed == seen       # and nothing that cannot happen


def test_cuda_graph_buckets_decode_at_the_graphs_table_width():
    space = llama_1b()
    variants = warmup.kernel_variants(space)
    for bucket in BUCKETS:
        splits = attention.decode_num_splits(bucket, 8, space.max_table_width, 16, None, space.sms)
        assert KernelVariant("paged_decode", (("NUM_SPLITS", splits),) + FLAGS) in variants
    # every decode batch replays a graph (max_num_seqs <= the last bucket): no eager decode variant is listed
    listed = {dict(v.key)["NUM_SPLITS"] for v in variants if v.kernel == "paged_decode"}
    assert listed == {attention.decode_num_splits(b, 8, space.max_table_width, 16, None, space.sms) for b in BUCKETS}


def test_every_prefill_tile_of_every_chunk_length_is_listed():
    space = llama_1b()
    variants = warmup.kernel_variants(space)
    config = attention.prefill_config_for_arch(90, 64)
    block_qs = set()
    for longest in range(2, space.max_query_len + 1):
        tiles = attention.prefill_tiles(longest, 4, config)
        assert KernelVariant("paged_prefill", tuple(sorted(tiles.items())) + FLAGS) in variants, longest
        block_qs.add(tiles["BLOCK_Q"])
    assert block_qs == {4, 8, 16, 32}       # 16..128 rows of 4 heads each


def test_sliding_window_and_softcap_layers_get_their_own_variants():
    space = llama_1b(attention=((None, None), (4096, 50.0)), max_model_len=32768)
    variants = warmup.kernel_variants(space)
    windowed = {dict(v.key)["NUM_SPLITS"] for v in variants if v.kernel == "paged_decode" and dict(v.key)["SLIDING"]}
    assert windowed == {attention.decode_num_splits(b, 8, space.max_table_width, 16, 4096, space.sms)
                        for b in BUCKETS}
    assert max(windowed) <= 4096 // attention.MIN_TOKENS_PER_SPLIT      # the window bounds the split count
    assert any(v.kernel == "paged_prefill" and dict(v.key)["SOFTCAP"] for v in variants)


def test_awq_and_moe_variants_follow_the_token_count():
    space = llama_1b(graph_batch_sizes=(), max_num_seqs=32, max_num_batched_tokens=1024, max_model_len=2048,
                     awq=((1024, 512, 128),), moe_top_k=(1, 2))
    variants = warmup.kernel_variants(space)
    device = warmup._device(space)
    for tokens in range(1, space.max_num_batched_tokens + 1):
        config = awq.gemm_config(tokens, 128, device)
        split_k = awq.choose_split_k(tokens, 1024, 512, config, device, sms=space.sms)
        assert KernelVariant("awq_gemm", (("N", 1024), ("K", 512), ("GROUP_SIZE", 128), *sorted(config.items()),
                                          ("M", warmup.int_class(tokens)),
                                          ("split_k", warmup.int_class(split_k)))) in variants, tokens
    pairs = {dict(v.key)["num_pairs"] for v in variants if v.kernel == "fused_moe"}
    assert pairs == {1, "16n", "n"}


@pytest.mark.parametrize("space", [
    llama_1b(),
    llama_1b(graph_batch_sizes=(), max_num_seqs=48, max_model_len=12288, attention=((None, None), (2048, None))),
    llama_1b(graph_batch_sizes=(1, 2, 4, 8, 16), max_num_seqs=40, max_num_batched_tokens=512,
             awq=((2048, 1024, 64),), moe_top_k=(2,)),
], ids=["graphs", "eager-windowed", "graphs-past-512-like-awq-moe"])
def test_the_plan_launches_every_variant(space):
    captured = frozenset(space.graph_batch_sizes)
    plan = warmup.warmup_plan(space, captured)
    launched = set().union(*(warmup.graph_variants(space, b) for b in captured)) if captured else set()
    for step in plan:
        launched |= warmup.step_variants(space, step)
    static = {KernelVariant("fused_ops", ()), KernelVariant("copy_blocks", ())}
    assert launched | static == warmup.kernel_variants(space)
    assert len(plan) == len(set(plan))
    for step in plan:   # each step is one the scheduler can produce, its block table wide enough for it
        assert len(step.query_lens) <= space.max_num_seqs
        assert sum(step.query_lens) <= max(space.max_num_batched_tokens, len(step.query_lens))
        assert max(step.query_lens) <= space.max_query_len
        assert step.table_width * space.block_size >= max(step.query_lens)
        assert step.table_width % 16 == 0 and step.table_width <= space.max_table_width


def test_a_dense_model_with_graphs_warms_up_in_a_few_steps():
    plan = warmup.warmup_plan(llama_1b(), frozenset(BUCKETS))
    assert [max(step.query_lens) for step in plan] == [2, 5, 9, 17]      # one per prefill tile (4..32 tokens)


def test_variant_keys_follow_tritons_specialization():
    import torch
    assert compile_guard.arg_class(1) == 1
    assert compile_guard.arg_class(32) == ("i32", True)
    assert compile_guard.arg_class(33) == ("i32", False)
    assert compile_guard.arg_class(2**40) == ("i64", True)
    x = torch.zeros(8, dtype=torch.float16)
    assert compile_guard.arg_class(x) == ("torch.float16", True)
    assert compile_guard.arg_class(x[1:]) == ("torch.float16", False)


def test_a_gpu_compile_after_startup_is_counted_and_logged(caplog, monkeypatch):
    """On a GPU Triton itself reports each compile (jit_post_compile_hook): called here as Triton calls it."""
    if INTERPRETED:
        pytest.skip("the interpreter compiles nothing: its accounting is tested by the triton cases")
    from triton import knobs
    compile_guard.install()
    hook = knobs.runtime.jit_post_compile_hook
    monkeypatch.setattr(compile_guard, "COUNTER", compile_guard.CompileCounter())
    hook(key=(), repr="_decode_split_kernel[num_warps=4](...)", fn=None, compile={}, is_manual_warmup=False,
         already_compiled=False)
    assert compile_guard.COUNTER.at_startup == 1 and compile_guard.compiles_after_startup() == 0
    compile_guard.mark_startup_complete()
    with caplog.at_level(logging.WARNING, logger="pagedlab.kernels"):
        hook(key=(), repr="_prefill_kernel[num_warps=8](...)", fn=None, compile={}, is_manual_warmup=False,
             already_compiled=False)
    assert compile_guard.compiles_after_startup() == 1
    assert compile_guard.stats()["late_compiles"] == ["_prefill_kernel[num_warps=8](...)"]
    assert "_prefill_kernel" in caplog.text and "after startup" in caplog.text


# --- in the interpreter: a real engine ----------------------------------------------------------------------------
def make_llm(model_dir):
    from pagedlab import LLM
    return LLM(model_dir, device="cpu", dtype="float32", block_size=16, max_model_len=256, max_num_seqs=6,
               max_num_batched_tokens=48, num_gpu_blocks_override=64)


# These cases exist only in the interpreter; test_kernels_in_interpreter_subprocess runs them there.
if INTERPRETED:
    def test_triton_no_variant_is_new_after_warm_up(tiny_model):  # noqa: F811
        from pagedlab import SamplingParams
        compile_guard.reset()
        llm = make_llm(tiny_model("mixtral"))
        assert compile_guard.COUNTER.startup_complete and compile_guard.COUNTER.at_startup > 0
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        # a 2-token prompt alone (the fewest prefill rows), then a batch whose 47- and 60-token prompts are chunked
        # next to decoding rows (mixed steps, chunks after a cached prefix), then decode at several batch sizes
        llm.generate([{"prompt_token_ids": [5, 6]}], params, use_tqdm=False)
        prompts = [{"prompt_token_ids": [3 + (i * 7 + j) % 250 for j in range(n)]} for i, n in
                   enumerate([47, 3, 60, 11, 1, 30])]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 5 for o in outputs)
        assert compile_guard.compiles_after_startup() == 0, compile_guard.stats()["late_compiles"]

    def test_triton_guard_counts_a_variant_the_warm_up_did_not_launch(caplog):
        import torch

        from pagedlab import kernels
        compile_guard.install()
        compile_guard.mark_startup_complete()
        query = torch.zeros(3, 4, 16)
        cache = torch.zeros(4, 16, 2, 16)
        tables = torch.zeros(3, 16, dtype=torch.int32)
        lens = torch.ones(3, dtype=torch.int32)
        before = compile_guard.compiles_after_startup()
        with caplog.at_level(logging.WARNING, logger="pagedlab.kernels"):
            kernels.paged_decode_attention(query, cache, cache, tables, lens, 0.25, num_splits=7)   # no engine picks 7
            kernels.paged_decode_attention(query, cache, cache, tables, lens, 0.25, num_splits=7)   # the same again
        assert compile_guard.compiles_after_startup() == before + 2      # the split kernel and the merge, once each
        assert "after startup" in caplog.text and "_decode_split_kernel" in caplog.text
