"""Kernel warm-up: every Triton variant the engine can meet, launched once before it serves.

A Triton kernel compiles per variant: its constexpr arguments (tile sizes, a split count, per-layer switches) and
the classes of its runtime ints (1, a multiple of 16, other). The launchers pick those from the batch, so a
served engine meets new variants long after startup (a mixed batch with a short prompt chunk: fewer prefill rows; a
decode batch past the CUDA graphs: another split count; an AWQ GEMM at a new row count), and each one stalls its
step for the compiler. Here:

- `KernelSpace` is what the kernels can be asked to do: the engine's limits (max_model_len, block_size,
  max_num_seqs, max_num_batched_tokens, the CUDA-graph buckets) and the model's layers (heads, head_dim, sliding
  windows and soft-caps, AWQ GEMM shapes, MoE top-k) on one device.
- `kernel_variants(space)` lists every variant (kernel name + the key its launcher selects), a pure function built
  on the launchers' own selectors (`decode_num_splits`, `prefill_tiles`, `gemm_config`, `choose_split_k`), over
  every step the scheduler can produce: prefill/mixed steps of 2..max_num_batched_tokens tokens whose longest
  chunk is 2..max_model_len, decode batches of every size and block-table width (CUDA-graph buckets at the graphs'
  width).
- `warmup_plan(space)` picks a few steps that together launch all of them; `warm_up(runner)` runs those steps'
  forward passes over the real KV cache with dummy inputs (their slots are -1: nothing is written), plus one
  copy-on-write copy, then tells the compile guard (kernels/compile_guard.py) that startup is over.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch

from pagedlab.kernels import compile_guard, copy_blocks, use_triton
from pagedlab.kernels import attention, awq  # None without Triton: then nothing is warmed up
from pagedlab.layers.attention import AttentionMetadata, set_attention_metadata

logger = logging.getLogger("pagedlab.executor")

TABLE_WIDTH_MULTIPLE = 16       # ModelRunner.prepare pads block tables to a multiple of 16 columns


@dataclass(frozen=True)
class KernelSpace:
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    graph_batch_sizes: tuple[int, ...]      # decode batches up to the last one replay a graph; () = eager only
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention: tuple[tuple[int | None, float | None], ...] = ((None, None),)    # distinct (sliding_window, softcap)
    awq: tuple[tuple[int, int, int], ...] = ()      # distinct (N, K, group_size) of the AWQ GEMMs
    moe_top_k: tuple[int, ...] = ()                 # distinct top-k of the MoE layers
    device_type: str = "cuda"
    arch: int = 90          # compute capability x 10 (kernels.triton_utils.device_arch); 0 on the CPU
    sms: int = 132

    @property
    def max_table_width(self) -> int:
        return table_width(self, self.max_model_len)

    @property
    def table_widths(self) -> range:
        return range(TABLE_WIDTH_MULTIPLE, self.max_table_width + 1, TABLE_WIDTH_MULTIPLE)

    @property
    def max_query_len(self) -> int:
        return min(self.max_model_len, self.max_num_batched_tokens)


@dataclass(frozen=True)
class KernelVariant:
    kernel: str
    key: tuple          # (name, value) pairs: what the launcher selects for this variant


@dataclass(frozen=True)
class WarmupStep:
    """A forward pass: prefill (any step with a chunk of more than one token: mixed batches too) or decode."""
    query_lens: tuple[int, ...]
    table_width: int

    @property
    def is_decode(self) -> bool:
        return max(self.query_lens) == 1


def int_class(value: int):
    """What Triton keeps of a runtime int in its cache key."""
    return 1 if value == 1 else "16n" if value % 16 == 0 else "n"


# --- the variants of one step ------------------------------------------------------------------------------------
def _device(space: KernelSpace) -> torch.device:
    return torch.device(space.device_type)


@functools.lru_cache(maxsize=1 << 16)
def attention_variants(space: KernelSpace, max_query_len: int, num_seqs: int, table_width: int) -> frozenset:
    out = set()
    group = space.num_heads // space.num_kv_heads
    for window, softcap in space.attention:
        flags = (("SLIDING", bool(window)), ("SOFTCAP", bool(softcap)))
        if max_query_len == 1:
            splits = attention.decode_num_splits(num_seqs, space.num_kv_heads, table_width, space.block_size,
                                                 window, space.sms)
            out.add(KernelVariant("paged_decode", (("NUM_SPLITS", splits),) + flags))
            if splits > 1:
                out.add(KernelVariant("decode_merge", (("NUM_SPLITS", splits),)))
        else:
            config = _prefill_config(space)
            tiles = attention.prefill_tiles(max_query_len, group, config)
            out.add(KernelVariant("paged_prefill", tuple(sorted(tiles.items())) + flags))
    return frozenset(out)


def _prefill_config(space: KernelSpace) -> dict:
    if space.device_type != "cuda":
        return attention.prefill_config(_device(space), space.head_dim)
    return attention.prefill_config_for_arch(space.arch, space.head_dim)


@functools.lru_cache(maxsize=1 << 16)
def token_variants(space: KernelSpace, num_tokens: int) -> frozenset:
    """The kernels whose variant follows the step's token count: the AWQ GEMMs (tiles and split-K by rows) and the
    MoE GEMMs (the class of tokens x top-k)."""
    out = set()
    if space.awq:
        device = _device(space)
        for n, k, group_size in space.awq:
            config = awq.gemm_config(num_tokens, group_size, device)
            split_k = awq.choose_split_k(num_tokens, n, k, config, device, sms=space.sms)
            tiles = tuple(sorted((key, v) for key, v in config.items()))
            out.add(KernelVariant("awq_gemm", (("N", n), ("K", k), ("GROUP_SIZE", group_size), *tiles,
                                               ("M", int_class(num_tokens)), ("split_k", int_class(split_k)))))
    for top_k in space.moe_top_k:
        out.add(KernelVariant("fused_moe", (("num_pairs", int_class(num_tokens * top_k)),)))
    return frozenset(out)


def step_variants(space: KernelSpace, step: WarmupStep) -> set:
    """Every variant the kernels select for `step`, as the launchers choose them."""
    width = step.table_width
    if step.is_decode and space.graph_batch_sizes and len(step.query_lens) <= space.graph_batch_sizes[-1]:
        return graph_variants(space, next(b for b in space.graph_batch_sizes if b >= len(step.query_lens)))
    return (attention_variants(space, max(step.query_lens), len(step.query_lens), width)
            | token_variants(space, sum(step.query_lens)) | {KernelVariant("write_kv_cache", ())})


def graph_variants(space: KernelSpace, batch: int) -> set:
    """A CUDA-graph bucket: captured at batch rows over the graphs' block tables, max_table_width wide."""
    return (attention_variants(space, 1, batch, space.max_table_width) | token_variants(space, batch)
            | {KernelVariant("write_kv_cache", ())})


# --- every step the scheduler can produce ---------------------------------------------------------------------
def _prefill_query_lens(space: KernelSpace, longest: int, num_tokens: int) -> tuple[int, ...]:
    """A step of num_tokens tokens whose longest chunk is `longest`: that chunk and decode rows, or chunks of
    `longest` where the rows would exceed max_num_seqs."""
    rest = num_tokens - longest
    if rest + 1 <= space.max_num_seqs:
        return (longest,) + (1,) * rest
    full, tail = divmod(num_tokens, longest)
    return (longest,) * full + ((tail,) if tail else ())


def _decode_batches(space: KernelSpace) -> range:
    """Decode batch sizes that run eagerly: past the largest graph, or all of them without graphs."""
    first = space.graph_batch_sizes[-1] + 1 if space.graph_batch_sizes else 1
    return range(first, space.max_num_seqs + 1)


def table_width(space: KernelSpace, context: int) -> int:
    """The block-table width prepare() gives a batch whose longest context is `context` tokens."""
    m = TABLE_WIDTH_MULTIPLE
    return max(m, -(-context // (m * space.block_size)) * m)


def _covering_steps(space: KernelSpace):
    """Steps whose variants, together, are those of every step the scheduler can produce: the longest chunk and
    the token count select independent variants (attention vs AWQ/MoE), so each is swept on its own."""
    budget, max_q = space.max_num_batched_tokens, space.max_query_len
    for q in range(2, max_q + 1):
        yield WarmupStep((q,), table_width(space, q))
    if space.awq or space.moe_top_k:
        for t in range(3, budget + 1):      # the shortest longest chunk that packs t tokens into max_num_seqs
            longest = max(2, -(-t // space.max_num_seqs))
            if longest <= max_q:
                yield WarmupStep(_prefill_query_lens(space, longest, t), table_width(space, longest))
    for b in space.graph_batch_sizes:
        yield WarmupStep((1,) * b, space.max_table_width)
    for b in _decode_batches(space):
        for width in space.table_widths:
            yield WarmupStep((1,) * b, width)


def kernel_variants(space: KernelSpace) -> set[KernelVariant]:
    """Every kernel variant an engine of this space can launch."""
    out: set[KernelVariant] = set()
    for step in _covering_steps(space):
        out |= step_variants(space, step)
    if space.device_type == "cuda":
        out.add(KernelVariant("fused_ops", ()))       # rms_norm, silu_and_mul, rotary: one variant each
    out.add(KernelVariant("copy_blocks", ()))
    return out


def warmup_plan(space: KernelSpace, captured: frozenset[int] = frozenset()) -> list[WarmupStep]:
    """Steps that launch every variant of kernel_variants(space), each step bringing a new one; decode batches
    that replay a captured graph (`captured` buckets) are compiled by the capture already."""
    covered = set().union(*(graph_variants(space, b) for b in captured)) if captured else set()
    plan = []
    for step in _covering_steps(space):
        if step.is_decode and len(step.query_lens) in captured:
            continue
        new = step_variants(space, step) - covered
        if new:
            plan.append(step)
            covered |= new
    return plan


# --- running it -------------------------------------------------------------------------------------------------
def kernel_space(runner) -> KernelSpace:
    """The space of a built ModelRunner (caches allocated, graphs captured)."""
    from pagedlab.kernels.triton_utils import device_arch, num_sms
    sched, layer = runner.config.scheduler, runner.attention_layers[0]
    awq, moe = set(), set()
    for module in runner.model.modules():
        if hasattr(module, "qweight") and hasattr(module, "qzeros"):
            method = getattr(module, "quant_method", None)
            group = getattr(method, "group_size", None)
            if group is not None:
                awq.add((module.qweight.shape[1] * 8, module.qweight.shape[0], group))
        if hasattr(module, "top_k") and hasattr(module, "w13"):
            moe.add(module.top_k)
    return KernelSpace(
        max_model_len=sched.max_model_len, block_size=runner.block_size, max_num_seqs=sched.max_num_seqs,
        max_num_batched_tokens=sched.max_num_batched_tokens, graph_batch_sizes=tuple(runner.graph_batch_sizes),
        num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim,
        attention=tuple(sorted({(a.sliding_window, a.softcap) for a in runner.attention_layers},
                               key=lambda kind: (kind[0] or 0, kind[1] or 0))),
        awq=tuple(sorted(awq)), moe_top_k=tuple(sorted(moe)), device_type=runner.device.type,
        arch=device_arch(runner.device), sms=num_sms(runner.device))


@torch.inference_mode()
def run_step(runner, step: WarmupStep) -> None:
    """One eager forward pass of `step`'s shape over the runner's cache: dummy tokens, fresh contexts whose
    blocks are all block 0, slots -1 (no K/V is written)."""
    device, lens = runner.device, list(step.query_lens)
    num_tokens = sum(lens)
    positions = torch.cat([torch.arange(q) for q in lens]).to(device)
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros(len(lens), step.table_width, dtype=torch.int32, device=device),
        max_query_len=max(lens), max_seq_len=max(lens), is_decode=step.is_decode)
    set_attention_metadata(meta)
    try:
        runner.model(torch.zeros(num_tokens, dtype=torch.int64, device=device), positions)
    finally:
        set_attention_metadata(None)


def warm_up(runner) -> list[WarmupStep]:
    """Launch every kernel variant the runner's configuration can meet, then mark startup complete. Returns the
    steps it ran (none where the kernels are torch's references: nothing compiles)."""
    compile_guard.install()
    plan = []
    if runner.k_caches and use_triton(runner.k_caches[0]):
        started = time.perf_counter()
        space = kernel_space(runner)
        plan = warmup_plan(space, frozenset(runner.graphs))
        for step in plan:
            run_step(runner, step)
        block = torch.zeros(1, 2, dtype=torch.int64, device=runner.device)     # block 0 onto itself: a no-op
        copy_blocks(runner.k_caches, runner.v_caches, block)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        logger.info("Kernel warm-up: %d steps in %.1f s, %d Triton variants compiled (the graph capture's before)",
                    len(plan), time.perf_counter() - started, compile_guard.COUNTER.at_startup)
    compile_guard.mark_startup_complete()
    return plan
