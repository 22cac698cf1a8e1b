"""Build engines on the simulator executor and check the memory invariants the core must keep."""
from collections import Counter

from pagedlab.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedlab.core.kv_cache_manager import KVCacheManager
from pagedlab.core.static_allocator import StaticAllocator
from pagedlab.engine.llm_engine import LLMEngine
from pagedlab.sim.cost_model import CostModel
from pagedlab.sim.simulator import SimExecutor, VirtualClock


def sim_engine(num_blocks=64, block_size=4, num_cpu_blocks=0, max_model_len=64, **kwargs) -> LLMEngine:
    cache_keys = {"enable_prefix_caching", "allocator", "static_reservation"}
    cache = CacheConfig(block_size=block_size, **{k: v for k, v in kwargs.items() if k in cache_keys})
    sched = SchedulerConfig(max_model_len=max_model_len, **{k: v for k, v in kwargs.items() if k not in cache_keys})
    clock = VirtualClock()
    return LLMEngine(EngineConfig(cache=cache, scheduler=sched), CheckedExecutor(CostModel(), clock, block_size),
                     num_blocks, num_cpu_blocks, clock=clock)


class CheckedExecutor(SimExecutor):
    """The simulator's executor, checking that the step's block moves can be done in the executor's order
    (swap-out, swap-in, copy) without one reading a block another has already overwritten."""

    def execute(self, out):
        swap_out_gpu = {g for g, _ in out.blocks_to_swap_out}
        swap_out_cpu = {c for _, c in out.blocks_to_swap_out}
        swap_in_cpu = {c for c, _ in out.blocks_to_swap_in}
        swap_in_gpu = {g for _, g in out.blocks_to_swap_in}
        copy_src = {s for s, _ in out.blocks_to_copy}
        copy_dst = [d for _, d in out.blocks_to_copy]
        assert not swap_in_cpu & swap_out_cpu, "a CPU block is overwritten by a swap-out before its swap-in"
        assert not swap_in_gpu & swap_out_gpu, "a request was swapped in and out in one step"
        assert len(copy_dst) == len(set(copy_dst)) and not copy_src & set(copy_dst)
        assert not copy_src & swap_in_gpu, "a copy source is overwritten by a swap-in before it is copied"
        return super().execute(out)


def check_invariants(engine: LLMEngine) -> None:
    kv = engine.kv
    usage = engine.memory_usage()
    assert usage.tokens + usage.internal + usage.reserved + usage.external + usage.free == usage.capacity
    assert min(usage.tokens, usage.internal, usage.reserved, usage.external, usage.free) >= 0
    if isinstance(kv, StaticAllocator):
        regions = sorted(kv.regions.values()) + sorted(r for spares in kv.spare.values() for r in spares)
        spans = sorted(regions + kv.holes)
        assert sum(length for _, length in spans) == kv.num_blocks
        for (a, la), (b, _) in zip(spans, spans[1:]):
            assert a + la <= b, "two regions overlap"
        return
    for pool, tables in ((kv.pool, kv.tables), (kv.cpu_pool, kv.cpu_tables)):
        refs = Counter(b.block_id for table in tables.values() for b in table)
        for block in pool.blocks:
            assert block.ref_count >= 0
            assert block.ref_count == refs.get(block.block_id, 0), f"{block} owned by {refs.get(block.block_id)}"
            assert (block.ref_count == 0) == (block.block_id in pool.free_queue)
        assert pool.num_extra_refs == sum(max(0, b.ref_count - 1) for b in pool.blocks)
        assert pool.num_cached_free == sum(1 for i in pool.free_queue if pool.blocks[i].block_hash is not None)
    live = {s.seq_id for r in engine.scheduler.requests.values() for s in r.seqs if s.finish_reason is None}
    assert set(kv.tables) | set(kv.cpu_tables) <= live


def check_all_returned(engine: LLMEngine) -> None:
    kv = engine.kv
    assert not engine.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks
    if isinstance(kv, KVCacheManager):
        assert kv.cpu_pool.num_free == kv.cpu_pool.num_blocks
        assert not kv.tables and not kv.cpu_tables
    else:
        assert not kv.regions and not kv.spare


def run_to_end(engine: LLMEngine, max_steps=100_000) -> dict:
    outputs = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o
        check_invariants(engine)
    return outputs
