"""Block pool, KV cache manager, static allocator and scheduler, driven through the simulator executor."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedlab import SamplingParams
from pagedlab import events as ev
from pagedlab.core.block_pool import BlockPool
from pagedlab.core.kv_cache_manager import KVCacheManager
from pagedlab.core.static_allocator import StaticAllocator
from pagedlab.sequence import Request
from tests.core_helpers import check_all_returned, check_invariants, run_to_end, sim_engine


def req(rid, tokens, max_tokens=4, n=1, **kw):
    return Request(rid, list(tokens), SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True, **kw))


# --- block pool -----------------------------------------------------------------------------------------------
def test_pool_evicts_least_recently_freed_cached_block():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.register(a, 111, (1,))
    pool.register(b, 222, (2,))
    pool.release(b)
    pool.release(a)
    assert pool.num_cached_free == 2
    again = pool.allocate()
    assert again is b and pool.lookup(222, (2,)) is None       # b was freed first: evicted first
    assert pool.lookup(111, (1,)) is a
    assert pool.lookup(111, (9,)) is None                     # a hash hit is verified against the tokens
    pool.take(a)
    assert a.ref_count == 1 and pool.num_free == 0 and c.ref_count == 1


# --- paged manager ----------------------------------------------------------------------------------------------
def test_new_block_only_when_last_is_full():
    kv = KVCacheManager(8, 4)
    r = req("a", range(5))
    seq = r.seqs[0]
    assert kv.allocate_slots(r, seq, 5)
    assert len(kv.block_table(seq)) == 2
    seq.num_computed_tokens = 5
    for total in (6, 7, 8):
        seq.token_ids.append(0)
        assert kv.allocate_slots(r, seq, 1)
        seq.num_computed_tokens = total
        assert len(kv.block_table(seq)) == 2
    seq.token_ids.append(0)
    assert kv.allocate_slots(r, seq, 1)
    assert len(kv.block_table(seq)) == 3


def test_fork_shares_blocks_and_copies_on_write():
    bus = ev.EventBus()
    events = []
    bus.subscribe(events.append)
    kv = KVCacheManager(8, 4, bus=bus)
    r = req("a", range(6), n=2)
    parent = r.seqs[0]
    kv.allocate_slots(r, parent, 6)
    parent.num_computed_tokens = 6
    child = parent.fork()
    kv.fork(parent, child)
    assert kv.block_table(child) == kv.block_table(parent)
    assert all(b.ref_count == 2 for b in kv.tables[parent.seq_id])
    shared_last = kv.block_table(parent)[1]
    for s in (parent, child):
        s.token_ids.append(7)
        assert kv.allocate_slots(r, s, 1)
    copies = kv.take_pending_copies()
    assert len(copies) == 1 and copies[0][0] == shared_last            # first writer copies ...
    assert kv.block_table(child)[1] == shared_last                       # ... the last one writes in place
    assert kv.block_table(parent)[0] == kv.block_table(child)[0]         # full blocks stay shared
    assert [e.kind for e in events].count(ev.BLOCK_COW) == 1


def test_prefix_cache_hit_leaves_a_token_to_compute():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    first = req("a", range(12))
    kv.allocate_slots(first, first.seqs[0], 12)
    first.seqs[0].num_computed_tokens = 12
    kv.on_computed(first, first.seqs[0])
    kv.free(first.seqs[0])
    assert kv.pool.num_cached_free == 3
    same = req("b", range(12))
    prefix = kv.find_cached_prefix(same, same.seqs[0])
    assert len(prefix) == 2                                    # all 12 cached, but the last token is recomputed
    longer = req("c", list(range(8)) + [99, 98, 97, 96, 95])
    assert len(kv.find_cached_prefix(longer, longer.seqs[0])) == 2
    salted = Request("d", list(range(12)), SamplingParams(), cache_salt="other tenant")
    assert kv.find_cached_prefix(salted, salted.seqs[0]) == []
    assert kv.allocate_slots(same, same.seqs[0], 4, prefix)
    assert same.seqs[0].num_computed_tokens == 8 and same.num_cached_tokens == 8


def test_swap_keeps_blocks_shared_among_forks():
    kv = KVCacheManager(8, 4, num_cpu_blocks=8)
    r = req("a", range(8), n=3)
    parent = r.seqs[0]
    kv.allocate_slots(r, parent, 8)
    parent.num_computed_tokens = 8
    children = [parent.fork(), parent.fork()]
    for c in children:
        kv.fork(parent, c)
    seqs = [parent] + children
    moved = kv.swap_out(seqs)
    assert len(moved) == 2 and kv.num_free_blocks == 8
    assert all(b.ref_count == 3 for b in kv.cpu_tables[parent.seq_id])
    back = kv.swap_in(seqs)
    assert sorted(cpu for cpu, _ in back) == sorted(cpu for _, cpu in moved)
    assert kv.cpu_pool.num_free == 8 and all(b.ref_count == 3 for b in kv.tables[parent.seq_id])


# --- static allocator -----------------------------------------------------------------------------------------
def test_static_first_fit_and_external_fragmentation():
    kv = StaticAllocator(num_blocks=10, block_size=4, max_model_len=40, reservation="request")
    small, big, other = req("s", range(4), max_tokens=4), req("b", range(4), max_tokens=20), req("o", range(3), 5)
    assert kv.allocate_slots(small, small.seqs[0], 4)          # 2 blocks at 0
    assert kv.allocate_slots(big, big.seqs[0], 4)              # 6 blocks at 2
    assert kv.allocate_slots(other, other.seqs[0], 3)          # 2 blocks at 8
    assert kv.block_table(big.seqs[0]) == list(range(2, 8))
    kv.free(small.seqs[0])
    kv.free(other.seqs[0])
    usage = kv.usage(next_request_tokens=16)                  # 4 free blocks, in two holes of 2: too small
    assert usage.external == 16 and usage.free == 0
    assert not kv.allocate_slots(req("x", range(8), max_tokens=8), req("x", range(8)).seqs[0], 8)
    kv.free(big.seqs[0])
    assert kv.holes == [(0, 10)]                              # neighbours merge back into one hole


# --- scheduler ------------------------------------------------------------------------------------------------
def test_chunked_prefill_respects_token_budget():
    engine = sim_engine(num_blocks=64, max_num_batched_tokens=8, max_model_len=64)
    engine.add_request({"prompt_token_ids": list(range(20))}, SamplingParams(max_tokens=2, ignore_eos=True))
    sizes = []
    while engine.has_unfinished_requests():
        engine.step()
        sizes.append(engine.last_step.num_batched_tokens)
    assert sizes == [8, 8, 4, 1]


def test_preempts_most_recently_admitted():
    engine = sim_engine(num_blocks=6, block_size=4, max_model_len=24)
    for i in range(3):
        engine.add_request({"prompt_token_ids": list(range(i, i + 7))},
                           SamplingParams(max_tokens=10, ignore_eos=True), request_id=str(i))
    preempted = []
    engine.bus.subscribe(lambda e: preempted.append(e.data["request"].request_id)
                         if e.kind == ev.REQUEST_PREEMPTED else None)
    outputs = run_to_end(engine)
    assert preempted and preempted[0] == "2"
    assert all(len(o.outputs[0].token_ids) == 10 for o in outputs.values())
    check_all_returned(engine)


def test_request_that_can_never_fit_is_rejected_not_left_waiting():
    engine = sim_engine(num_blocks=4, block_size=4, max_model_len=16)
    engine.add_request({"prompt_token_ids": list(range(17))}, SamplingParams(max_tokens=2), request_id="long")
    engine.add_request({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2, ignore_eos=True), request_id="ok")
    outputs = run_to_end(engine)
    assert "max_model_len (16)" in outputs["long"].error and outputs["long"].outputs[0].finish_reason == "error"
    assert outputs["ok"].error is None and len(outputs["ok"].outputs[0].token_ids) == 2
    check_all_returned(engine)


def test_abort_returns_every_block():
    engine = sim_engine(num_blocks=32, enable_prefix_caching=True)
    for i in range(4):
        engine.add_request({"prompt_token_ids": list(range(10))}, SamplingParams(n=2, max_tokens=20, ignore_eos=True),
                           request_id=str(i))
    for _ in range(5):
        engine.step()
    for i in range(4):
        assert engine.abort_request(str(i)).outputs[0].finish_reason == "abort"
    check_invariants(engine)
    check_all_returned(engine)


def test_static_batching_waits_for_the_whole_batch():
    engine = sim_engine(num_blocks=64, max_num_seqs=2, batching="static")
    for i, n in enumerate([2, 8, 2]):
        engine.add_request({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=n, ignore_eos=True),
                           request_id=str(i))
    first_step = {}
    while engine.has_unfinished_requests():
        engine.step()
        for r in engine.scheduler.running:
            first_step.setdefault(r.request_id, engine.scheduler.step_id)
    assert first_step["2"] > 8     # request 2 waits for request 1 although request 0 left early


@pytest.mark.parametrize("allocator", ["paged", "static"])
def test_every_request_finishes_with_its_length(allocator):
    engine = sim_engine(num_blocks=40, block_size=4, max_model_len=32, allocator=allocator)
    rng = random.Random(0)
    wanted = {}
    for i in range(30):
        wanted[str(i)] = rng.randint(1, 12)
        engine.add_request({"prompt_token_ids": [rng.randrange(100) for _ in range(rng.randint(1, 16))]},
                           SamplingParams(max_tokens=wanted[str(i)], ignore_eos=True), request_id=str(i))
    outputs = run_to_end(engine)
    assert {k: len(o.outputs[0].token_ids) for k, o in outputs.items()} == wanted
    check_all_returned(engine)


# --- property-based: random interleavings -------------------------------------------------------------------------
op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 12), st.integers(1, 3), st.integers(0, 3)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 40)),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=40), blocks=st.integers(6, 24), block_size=st.sampled_from([1, 2, 4]),
       mode=st.sampled_from(["recompute", "swap"]), caching=st.booleans(),
       allocator=st.sampled_from(["paged", "paged", "static"]), chunk=st.sampled_from([4, 7, 64]))
def test_random_interleavings_keep_memory_consistent(ops, blocks, block_size, mode, caching, allocator, chunk):
    max_len = blocks * block_size
    engine = sim_engine(num_blocks=blocks, block_size=block_size, num_cpu_blocks=blocks // 2, max_model_len=max_len,
                        preemption_mode=mode, enable_prefix_caching=caching, allocator=allocator,
                        max_num_batched_tokens=chunk, static_reservation="request")
    ids = 0
    for action in ops:
        if action[0] == "add":
            _, prompt_len, max_tokens, n, prefix = action
            prompt = [prefix] * min(prompt_len, 8) + list(range(ids, ids + max(0, prompt_len - 8)))
            engine.add_request({"prompt_token_ids": prompt}, SamplingParams(n=n, max_tokens=max_tokens,
                                                                            ignore_eos=True), request_id=str(ids))
            ids += 1
        elif action[0] == "step":
            for _ in range(action[1]):
                engine.step()
                check_invariants(engine)
        else:
            engine.abort_request(str(action[1]))
            check_invariants(engine)
    run_to_end(engine)
    check_all_returned(engine)
