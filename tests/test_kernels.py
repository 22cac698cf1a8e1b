"""Paged KV-cache kernels: Triton vs the torch reference vs a naive float64 computation written here.

The Triton kernels run on the CPU in Triton's interpreter, which Triton chooses when it is first imported:
TRITON_INTERPRET=1 must be set by then (tests/conftest.py sets it for the suite). This module never sets
it itself, since by the time it is imported triton may already be loaded for the GPU; instead, when the
interpreter is not active, the Triton cases (ids containing "triton") are skipped here and
test_kernels_in_interpreter_subprocess runs them in a fresh python with TRITON_INTERPRET=1.

Interpreter limits shape these tests: no bf16 arithmetic (fp32 and fp16 only) and programs run one after
another in numpy, so shapes are tiny. fp8 (float8_e4m3fn) loads and stores work, but its fp32 -> fp8
rounding is wrong, so fp8 writes use values that need no rounding (GPU rounding: bench_kernels.py).
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from pagedlab import kernels
from pagedlab.kernels import reference
from tests.interpreter import run_triton_cases_in_interpreter

try:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from pagedlab.kernels import attention
    INTERPRETED = (os.environ.get("TRITON_INTERPRET") == "1"
                   and isinstance(tl.zeros, InterpretedFunction)
                   and isinstance(attention._decode_split_kernel, InterpretedFunction))
    HAVE_TRITON = True
except ImportError:
    INTERPRETED = HAVE_TRITON = False

FP8 = torch.float8_e4m3fn
# The Triton cases exist only where the interpreter is active; elsewhere test_kernels_in_interpreter_subprocess runs them.
IMPLS = ["reference", "triton"] if INTERPRETED else ["reference"]
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


@pytest.fixture(autouse=True)
def _dispatch_follows_impl(request, monkeypatch):
    """Route the public functions to the implementation a test is parametrized with."""
    impl = getattr(request.node, "callspec", None) and request.node.callspec.params.get("impl")
    if impl is not None:
        monkeypatch.setattr(kernels, "use_triton", lambda tensor: impl == "triton")


def seed(*params) -> int:
    """A per-case seed that is stable across runs (hash() of a str is not)."""
    return zlib.crc32(repr(params).encode())


def test_kernels_in_interpreter_subprocess():
    run_triton_cases_in_interpreter(__file__)


# ---------------------------------------------------------------------------------------------------------------
# Test data and the naive float64 computation


def make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, generator):
    return [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
            for _ in range(2)]


def make_block_tables(context_lens, block_size, num_blocks, generator, spare_columns=2):
    """Each sequence gets distinct, randomly placed physical blocks; unused columns hold an out-of-range block
    number, so a kernel that reads past a sequence's blocks fails loudly instead of reading valid data."""
    needed = [math.ceil(n / block_size) for n in context_lens]
    width = max(needed) + spare_columns
    physical = torch.randperm(num_blocks, generator=generator).tolist()
    table = torch.full((len(context_lens), width), 10**6, dtype=torch.int32)
    for b, n in enumerate(needed):
        table[b, :n] = torch.tensor(physical[:n], dtype=torch.int32)
        physical = physical[n:]
    return table


def naive_gather(cache, table_row, seq_len, scale) -> torch.Tensor:
    """[seq_len, Hkv, D] float64, position by position."""
    block_size = cache.shape[1]
    rows = [cache[int(table_row[p // block_size]), p % block_size] for p in range(seq_len)]
    return torch.stack(rows).double() * (1.0 if scale is None else float(scale))


def naive_attention(query, keys, values, q_positions, scale, window=None, softcap=None) -> torch.Tensor:
    """Query row i (at position q_positions[i]) attends to keys 0..q_positions[i] (the last `window` of them),
    head by head, in float64; scores soft-capped to softcap * tanh(scores / softcap) if softcap."""
    num_heads, num_kv_heads = query.shape[1], keys.shape[1]
    out = torch.empty(query.shape, dtype=torch.float64)
    for i, q_pos in enumerate(q_positions):
        first = max(0, q_pos - window + 1) if window else 0
        for h in range(num_heads):
            kv_head = h // (num_heads // num_kv_heads)
            scores = keys[first:q_pos + 1, kv_head] @ query[i, h].double() * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            weights = torch.exp(scores - scores.max())
            out[i, h] = (weights / weights.sum()) @ values[first:q_pos + 1, kv_head]
    return out


def assert_close(actual, expected, dtype):
    assert not actual.isnan().any(), "output has NaN: an element was not written"
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCE[dtype])


# ---------------------------------------------------------------------------------------------------------------
# write_kv_cache


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, FP8])
def test_write_kv_cache(impl, block_size, cache_dtype):
    g = torch.Generator().manual_seed(seed(block_size, cache_dtype))
    num_tokens, num_kv_heads, head_dim, num_blocks = 9, 2, 16, 12
    # key/value as strided views into a fused qkv projection, as the model runner produces them
    qkv = torch.randn(num_tokens, 5, num_kv_heads, head_dim, generator=g) * 4
    k_scale, v_scale = None, None
    if cache_dtype == FP8:
        # x / scale exactly representable in fp8 (power-of-two scales), so no rounding happens: Triton's
        # interpreter rounds fp32 -> fp8 wrongly (it drops the carry into the exponent). GPU rounding is
        # checked against the reference by benchmarks/bench_kernels.py.
        k_scale, v_scale = 0.0625, torch.tensor(0.03125)
        qkv = qkv.mul(10).to(FP8).float()
        qkv[:, 1] *= k_scale
        qkv[:, 3] *= float(v_scale)
        qkv[0, 1, 0, 0] = 1e4  # saturates
    key, value = qkv[:, 1], qkv[:, 3]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[[2, 5]] = -1  # padding tokens
    k_cache, v_cache = (torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan")).to(cache_dtype)
                        for _ in range(2))

    kernels.write_kv_cache(key, value, k_cache, v_cache, slots, k_scale, v_scale)

    for cache, source, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        flat = cache.view(-1, num_kv_heads, head_dim)
        for t, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            expected = source[t] if scale is None else (source[t] / float(scale)).clamp(-448, 448)
            assert torch.equal(flat[slot].float(), expected.to(cache_dtype).float()), f"token {t} at slot {slot}"
        untouched = torch.ones(flat.shape[0], dtype=torch.bool)
        untouched[slots[slots >= 0]] = False
        assert flat[untouched].float().isnan().all(), "a slot that no token maps to was written"


# ---------------------------------------------------------------------------------------------------------------
# Paged attention


def attention_case(case_seed, prefixes, q_lens, block_size, num_heads, num_kv_heads, dtype, cache_dtype, head_dim=16):
    """Sequences with prefixes[b] cached tokens and q_lens[b] new ones, K/V stored by write_kv_cache_ref."""
    g = torch.Generator().manual_seed(case_seed)
    seq_lens = [p + q for p, q in zip(prefixes, q_lens)]
    num_blocks = sum(math.ceil(n / block_size) for n in seq_lens) + 5
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype, g)
    block_tables = make_block_tables(seq_lens, block_size, num_blocks, g)
    fp8 = cache_dtype == FP8
    k_scale, v_scale = (0.04, torch.tensor([0.03])) if fp8 else (None, None)
    # the "true" K/V of every position; fp8 caches hold them quantized
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype) for n in seq_lens]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype) for n in seq_lens]
    for b, n in enumerate(seq_lens):
        slots = torch.tensor([int(block_tables[b, p // block_size]) * block_size + p % block_size for p in range(n)])
        reference.write_kv_cache_ref(keys[b], values[b], k_cache, v_cache, slots, k_scale, v_scale)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).mul(2).to(dtype)
    return dict(query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), k_scale=k_scale, v_scale=v_scale,
                scale=head_dim ** -0.5, keys=keys, values=values)


def naive_case_output(case, q_lens, window=None, softcap=None):
    """Float64 attention of every new token, from the cache contents (dequantized) read position by position."""
    out, start = [], 0
    for b, (seq_len, q_len) in enumerate(zip(case["seq_lens"].tolist(), q_lens)):
        keys = naive_gather(case["k_cache"], case["block_tables"][b], seq_len, case["k_scale"])
        values = naive_gather(case["v_cache"], case["block_tables"][b], seq_len, case["v_scale"])
        positions = range(seq_len - q_len, seq_len)
        out.append(naive_attention(case["query"][start:start + q_len], keys, values, positions, case["scale"],
                                   window, softcap))
        start += q_len
    return torch.cat(out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention(impl, num_splits, group, block_size, dtype):
    context_lens = [1, 19, 40]
    case = attention_case(seed(num_splits, group, block_size, dtype), [n - 1 for n in context_lens],
                          [1] * 3, block_size, num_heads=2 * group, num_kv_heads=2, dtype=dtype, cache_dtype=dtype)
    out = torch.full_like(case["query"], float("nan"))

    kernels.paged_decode_attention(case["query"], case["k_cache"], case["v_cache"], case["block_tables"],
                                   case["seq_lens"], case["scale"], num_splits=num_splits, out=out)

    assert_close(out, naive_case_output(case, [1] * 3), dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_empty_sequence_gives_zeros(impl, num_splits):
    case = attention_case(5, [0, 20], [1, 1], 3, num_heads=2, num_kv_heads=1, dtype=torch.float32,
                          cache_dtype=torch.float32)
    seq_lens = torch.tensor([0, 21], dtype=torch.int32)  # sequence 0 is batch padding
    out = torch.full_like(case["query"], float("nan"))

    kernels.paged_decode_attention(case["query"], case["k_cache"], case["v_cache"], case["block_tables"], seq_lens,
                                   case["scale"], num_splits=num_splits, out=out)

    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_close(out[1:], naive_case_output(case, [1, 1])[1:], torch.float32)


# (cached prefix, new tokens) per sequence: a fresh prompt, chunks after a cached prefix (chunked prefill or
# prefix caching; 14 puts the first new token just before a 16-key tile boundary), a sequence with no new
# tokens this step, and a decode token in the same batch
MIXED_BATCH = [(0, 13), (20, 7), (14, 5), (9, 0), (29, 1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_attention(impl, group, block_size, dtype):
    prefixes, q_lens = zip(*MIXED_BATCH)
    case = attention_case(seed(group, block_size, dtype), prefixes, q_lens, block_size,
                          num_heads=2 * group, num_kv_heads=2, dtype=dtype, cache_dtype=dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = torch.full_like(case["query"], float("nan"))

    kernels.paged_prefill_attention(case["query"], case["k_cache"], case["v_cache"], case["block_tables"],
                                    query_start_loc, case["seq_lens"], case["scale"], max(q_lens), out=out)

    assert_close(out, naive_case_output(case, q_lens), dtype)


# Hopper's tiles (128 x 64, 64 x 64), the old ones (128 x 32) and the interpreter's; with sequences that end on,
# just before and just after tile boundaries, a 1-token prompt, and chunks after a prefix longer than many tiles
PREFILL_TILES = [dict(BLOCK_M=128, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=64), dict(BLOCK_M=128, BLOCK_N=32),
                 dict(BLOCK_M=16, BLOCK_N=16)]
TILE_BATCH = [(0, 64), (0, 65), (0, 1), (0, 127), (300, 37), (63, 1), (70, 100)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", PREFILL_TILES, ids=lambda c: f"{c['BLOCK_M']}x{c['BLOCK_N']}")
@pytest.mark.parametrize("group,block_size,dtype", [(1, 16, torch.float32), (4, 5, torch.float16),
                                                    (2, 64, torch.float16)])
def test_prefill_tiles_match_naive_attention(impl, config, group, block_size, dtype):
    """Every tile shape the launcher may choose gives causal attention: the unmasked tiles below the diagonal, the
    masked diagonal ones, last query tiles first (the reference, which has no tiles, checks the cases)."""
    prefixes, q_lens = zip(*TILE_BATCH)
    case = attention_case(seed(config["BLOCK_M"], config["BLOCK_N"], group, block_size), prefixes, q_lens,
                          block_size, num_heads=2 * group, num_kv_heads=2, dtype=dtype, cache_dtype=dtype,
                          head_dim=32)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (case["query"], case["k_cache"], case["v_cache"], case["block_tables"], query_start_loc,
            case["seq_lens"], case["scale"], max(q_lens))
    out = torch.full_like(case["query"], float("nan"))
    if impl == "triton":
        attention.paged_prefill_attention(*args, out=out, config=config)
    else:
        kernels.paged_prefill_attention(*args, out=out)
    assert_close(out, naive_case_output(case, q_lens), dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window,softcap", [(1, None), (6, None), (17, 5.0)])
@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_sliding_window_attention_reads_no_key_outside_it(impl, window, softcap, block_size, kind):
    """Each query sees its last `window` keys (Mistral, Gemma); the K/V before every query's window are NaN, so a
    kernel that read one (even to mask it) would return NaN. Gemma 2's soft-capping rides along."""
    prefixes, q_lens = ([40, 7, 0], [1, 1, 1]) if kind == "decode" else ([0, 20, 14, 29], [13, 7, 5, 1])
    case = attention_case(seed(window, block_size, kind), prefixes, q_lens, block_size, num_heads=4,
                          num_kv_heads=2, dtype=torch.float32, cache_dtype=torch.float32)
    for b, prefix in enumerate(prefixes):
        for pos in range(max(0, prefix - window + 1)):      # before the first new token's window
            block = int(case["block_tables"][b, pos // block_size])
            case["k_cache"][block, pos % block_size] = float("nan")
            case["v_cache"][block, pos % block_size] = float("nan")
    out = torch.full_like(case["query"], float("nan"))
    args = (case["query"], case["k_cache"], case["v_cache"], case["block_tables"])
    options = dict(out=out, sliding_window=window, softcap=softcap)

    if kind == "decode":
        kernels.paged_decode_attention(*args, case["seq_lens"], case["scale"], num_splits=2, **options)
    else:
        query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        kernels.paged_prefill_attention(*args, query_start_loc, case["seq_lens"], case["scale"], max(q_lens),
                                        **options)

    assert_close(out, naive_case_output(case, q_lens, window, softcap), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_fp8_cache_attention(impl, dtype, kind):
    """fp8 caches: exact against the dequantized cache, and close to attention over the unquantized K/V."""
    prefixes, q_lens = ([12, 30], [1, 1]) if kind == "decode" else ([0, 17], [11, 6])
    case = attention_case(11 if kind == "decode" else 12, prefixes, q_lens, 3, num_heads=4, num_kv_heads=2,
                          dtype=dtype, cache_dtype=FP8)
    query_start_loc = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32)
    out = torch.full_like(case["query"], float("nan"))
    args = (case["query"], case["k_cache"], case["v_cache"], case["block_tables"])
    scales = dict(k_scale=case["k_scale"], v_scale=case["v_scale"], out=out)

    if kind == "decode":
        kernels.paged_decode_attention(*args, case["seq_lens"], case["scale"], num_splits=2, **scales)
    else:
        kernels.paged_prefill_attention(*args, query_start_loc, case["seq_lens"], case["scale"], max(q_lens), **scales)

    assert_close(out, naive_case_output(case, q_lens), dtype)
    unquantized, start = [], 0
    for b, q_len in enumerate(q_lens):
        positions = range(prefixes[b], prefixes[b] + q_len)
        unquantized.append(naive_attention(case["query"][start:start + q_len], case["keys"][b].double(),
                                           case["values"][b].double(), positions, case["scale"]))
        start += q_len
    torch.testing.assert_close(out.double(), torch.cat(unquantized), atol=0.1, rtol=0.1)


# ---------------------------------------------------------------------------------------------------------------
# Block copy and swap


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8])
def test_copy_blocks(impl, block_size, cache_dtype):
    g = torch.Generator().manual_seed(block_size)
    layers = [make_cache(10, block_size, 2, 16, cache_dtype, g) for _ in range(2)]
    k_caches, v_caches = [k for k, _ in layers], [v for _, v in layers]
    before = [c.clone() for c in k_caches + v_caches]
    mapping = torch.tensor([[1, 7], [1, 8], [4, 2]], dtype=torch.int64)

    kernels.copy_blocks(k_caches, v_caches, mapping)

    for cache, old in zip(k_caches + v_caches, before):
        expected = old.clone()
        for src, dst in mapping.tolist():
            expected[dst] = old[src]
        assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


def test_swap_blocks_copies_whole_blocks():
    g = torch.Generator().manual_seed(0)
    gpu_cache, _ = make_cache(6, 3, 2, 16, torch.float16, g)
    cpu_cache = torch.zeros(4, 3, 2, 16, dtype=torch.float16)
    mapping = torch.tensor([[5, 0], [2, 3]])

    kernels.swap_blocks(gpu_cache, cpu_cache, mapping)

    assert torch.equal(cpu_cache[0], gpu_cache[5]) and torch.equal(cpu_cache[3], gpu_cache[2])
    assert not cpu_cache[1:3].any()


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and launch heuristics


def test_use_triton_follows_device_and_interpret_flag(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.use_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_triton(cpu) == HAVE_TRITON


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_num_splits_fills_the_gpu_without_tiny_splits():
    sms = 132
    assert attention.choose_num_splits(batch=64, num_kv_heads=8, max_context=8192, sms=sms) == 1
    assert attention.choose_num_splits(batch=1, num_kv_heads=8, max_context=8192, sms=sms) == 32
    assert attention.choose_num_splits(batch=1, num_kv_heads=8, max_context=1024, sms=sms) == 4
    assert attention.choose_num_splits(batch=4, num_kv_heads=2, max_context=100, sms=sms) == 1


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_fp32_dots_follow_torch_matmul_precision():
    """Full fp32 in the kernels' dots while torch's fp32 matmuls are (its default); tf32 once torch allows it."""
    from pagedlab.kernels.triton_utils import dot_precision
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee" and dot_precision(torch.bfloat16) == "tf32"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)


# ---------------------------------------------------------------------------------------------------------------
# Fused mixture of experts


def naive_moe(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Token by token, slot by slot, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (w13[e].double() @ x[t].double()).chunk(2)
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_tokens", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe(impl, num_tokens, dtype):
    """Every token's top-2 of 5 experts (hidden 24, intermediate 20: no tile divides them); with 37 tokens some
    expert gets more rows than one block, and at 1 token most experts get none."""
    g = torch.Generator().manual_seed(seed(num_tokens, dtype))
    num_experts, hidden, inter, top_k = 5, 24, 20, 2
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    probs = torch.randn(num_tokens, num_experts, generator=g).softmax(-1)
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)

    out = kernels.fused_moe(x, w13, w2, topk_weights, topk_ids)

    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, naive_moe(x, w13, w2, topk_weights, topk_ids), dtype)


def test_align_pairs_groups_pairs_by_expert_in_padded_blocks():
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    from pagedlab.kernels.moe import align_pairs
    topk_ids = torch.tensor([[2, 0], [2, 1], [0, 2]])       # pairs 0..5; expert 3 gets none
    sorted_pairs, block_experts = align_pairs(topk_ids, num_experts=4, block_m=2)
    pad = 6
    assert sorted_pairs.tolist()[:8] == [1, 4, 3, pad, 0, 2, 5, pad]    # expert 0: pairs 1, 4; 1: 3; 2: 0, 2, 5
    assert block_experts.tolist()[:4] == [0, 1, 2, 2]
    assert (sorted_pairs[8:] == pad).all() and len(sorted_pairs) == (3 + 4) * 2
