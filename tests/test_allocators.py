"""Both allocators implement the KVAllocator protocol and behave alike where the protocol says they must; nothing
outside pagedlab/core branches on which one it holds."""
import pathlib
import re

import pytest

from pagedlab import SamplingParams
from pagedlab.core.interface import KVAllocator
from pagedlab.core.kv_cache_manager import KVCacheManager
from pagedlab.core.static_allocator import StaticAllocator
from pagedlab.sequence import Request
from tests.core_helpers import run_to_end, sim_engine

ALLOCATORS = {
    "paged": lambda blocks, bs, max_len: KVCacheManager(blocks, bs, max_model_len=max_len),
    "static": lambda blocks, bs, max_len: StaticAllocator(blocks, bs, max_len, reservation="request"),
}


def req(rid, prompt_len, max_tokens, n=1):
    return Request(rid, list(range(prompt_len)), SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True))


def prefilled(kv, rid, prompt_len, max_tokens):
    """A request whose prompt is computed and whose first token is sampled: decoding from here."""
    request = req(rid, prompt_len, max_tokens)
    seq = request.seqs[0]
    assert kv.allocate_slots(request, seq, prompt_len)
    seq.num_computed_tokens = prompt_len
    seq.token_ids.append(7)
    return request, seq


@pytest.mark.parametrize("name", ALLOCATORS)
def test_each_allocator_satisfies_the_protocol(name):
    kv = ALLOCATORS[name](16, 4, 64)
    assert isinstance(kv, KVAllocator)
    assert kv.label == name
    assert isinstance(kv.num_cpu_blocks, int) and isinstance(kv.grows_on_demand, bool)


def test_an_object_missing_a_call_is_not_an_allocator():
    class Partial:
        label, block_size = "partial", 4

        def block_table(self, seq):
            return []
    assert not isinstance(Partial(), KVAllocator)


@pytest.mark.parametrize("name", ALLOCATORS)
def test_allocate_check_and_free_agree(name):
    kv = ALLOCATORS[name](8, 4, 32)
    big = req("big", 30, 2)
    assert kv.blocks_to_finish(big) == 8 and not kv.can_allocate(big, big.seqs[0], 40)
    request = req("a", 6, 4)
    seq = request.seqs[0]
    assert not kv.holds(seq) and kv.block_table(seq) == []
    assert kv.can_allocate(request, seq, 6)
    free = kv.num_free_blocks
    assert not kv.can_allocate(request, seq, 6, keep_free=free)     # it would leave fewer than all blocks free
    assert not kv.allocate_slots(request, seq, 6, keep_free=free) and not kv.holds(seq)
    assert kv.allocate_slots(request, seq, 6)
    assert kv.holds(seq) and len(kv.block_table(seq)) * 4 >= 6 and kv.num_free_blocks < free
    assert kv.find_cached_prefix(request, req("b", 6, 4).seqs[0]) == []   # no prefix caching in either
    assert kv.cpu_block_table(seq) == [] and kv.unusable_holes(10) == []   # a 10-token request fits
    assert sum(kv.block_ref_counts()) == len(kv.blocks_held(seq))
    kv.free(seq)
    assert not kv.holds(seq) and kv.num_free_blocks == kv.num_blocks and kv.usage().tokens == 0


@pytest.mark.parametrize("name", ALLOCATORS)
@pytest.mark.parametrize("steps", [1, 3, 9])
def test_a_decode_run_applied_at_once_equals_stepping(name, steps):
    """plan_decode_run / advance_decode_run / usage_after_decode give the block tables, computed counts and
    accounting that allocate_slots gives one decode step at a time."""
    runs = []
    for at_once in (True, False):
        kv = ALLOCATORS[name](24, 4, 64)
        live = [prefilled(kv, str(i), prompt_len, 20) for i, prompt_len in enumerate([3, 4, 9])]
        seqs = [seq for _, seq in live]
        start = kv.usage()
        plan = kv.plan_decode_run(seqs, steps)
        assert len(plan) == steps
        if at_once:
            kv.advance_decode_run(seqs, steps)
            usage = kv.usage_after_decode(start, len(seqs) * steps, plan[-1])
        else:
            for j in range(steps):
                for request, seq in live:
                    assert kv.allocate_slots(request, seq, 1)
                for _, seq in live:
                    seq.num_computed_tokens += 1
                assert kv.usage_after_decode(start, len(seqs) * (j + 1), plan[j]) == kv.usage()
            usage = kv.usage()
        runs.append(([kv.block_table(seq) for seq in seqs], [seq.num_computed_tokens for seq in seqs], usage,
                     kv.num_free_blocks))
        assert usage == kv.usage()
    assert runs[0] == runs[1]


def test_a_paged_decode_run_stops_where_the_free_blocks_run_out():
    kv = KVCacheManager(4, 2)
    _, seq = prefilled(kv, "a", 4, 20)          # 2 blocks taken, 2 free: one new block every 2 steps
    assert kv.plan_decode_run([seq], 10) == [1, 1, 2, 2]


def test_a_static_decode_run_stops_where_a_region_ends():
    kv = StaticAllocator(8, 2, 16, reservation="request")
    _, seq = prefilled(kv, "a", 4, 2)           # a region of 3 blocks: 6 slots, 4 computed
    assert kv.plan_decode_run([seq], 10) == [1, 1]      # it enters its third block at once


@pytest.mark.parametrize("name", ["paged", "static"])
def test_forks_and_swaps_answer_through_the_protocol(name):
    engine = sim_engine(num_blocks=30, block_size=4, num_cpu_blocks=10, max_model_len=40, allocator=name,
                        preemption_mode="swap")
    for i in range(6):
        engine.add_request({"prompt_token_ids": list(range(5 + i))}, SamplingParams(n=2, max_tokens=8,
                                                                                    ignore_eos=True))
    outputs = run_to_end(engine)
    assert all(len(c.token_ids) == 8 for o in outputs.values() for c in o.outputs)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_no_allocator_kind_branch_outside_core():
    """Callers ask the allocator (capabilities, protocol calls); only pagedlab/core knows which one it is."""
    root = pathlib.Path(__file__).resolve().parents[1] / "pagedlab"
    branch = re.compile(r"\bkv\.(kind|label)\s*[!=]=|\.kind\s*[!=]=\s*[\"'](paged|static)[\"']"
                        r"|\bkv\.(tables|cpu_tables|cpu_pool|regions|holes|spare|pool)\b")
    offenders = [f"{path.relative_to(root.parent)}:{n}: {line.strip()}"
                 for path in root.rglob("*.py") if "core" not in path.relative_to(root).parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert offenders == []
