"""Where every KV slot is at one instant, in the vLLM paper's categories.

Each slot of the cache is in exactly one of:
  tokens    holds the KV of a computed token (a shared block counts once)
  internal  unused slot inside a partially filled block (paged: only each sequence's last block)
  reserved  allocated to a request for tokens it has not produced yet (static: the rest of its reservation)
  external  free, but in a hole too small for the next request's reservation (static allocator only)
  free      free and usable (includes free blocks that still hold a cached prefix: `cached_free`)
so tokens + internal + reserved + external + free == capacity, always. `shared_saved` counts the slots that
sequences would need on top if blocks shared by forks or the prefix cache were private copies.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import repeat


@dataclass(frozen=True)
class MemoryUsage:
    capacity: int
    tokens: int
    internal: int
    reserved: int
    external: int
    free: int
    cached_free: int = 0
    shared_saved: int = 0

    @property
    def allocated(self) -> int:
        return self.tokens + self.internal + self.reserved

    @property
    def unallocated(self) -> int:
        """Slots no sequence holds: free, in a usable hole or not."""
        return self.free + self.external

    @property
    def utilization(self) -> float:
        """Fraction of allocated slots that hold a token (the paper's memory efficiency)."""
        return self.tokens / self.allocated if self.allocated else 1.0

    @property
    def usage(self) -> float:
        """Fraction of the cache not free (what vLLM reports as kv_cache_usage_perc)."""
        return (self.capacity - self.free) / self.capacity if self.capacity else 0.0

    def as_dict(self) -> dict:
        return {**vars(self), "allocated": self.allocated, "utilization": self.utilization, "usage": self.usage}


def entering_residue(step: int, block_size: int) -> int:
    """At decode step `step` (1-based) a sequence with num_computed % block_size == this residue enters a new block:
    it writes position num_computed + step - 1, a new block when that is a multiple of block_size."""
    return (1 - step) % block_size


def blocks_entered(residues: list[int], block_size: int, max_steps: int) -> list[int]:
    """Cumulative blocks entered after each decode step by sequences of which residues[r] have num_computed % bs
    == r (entering_residue, counted for all at once)."""
    run, total = [], 0
    for j in range(1, max_steps + 1):
        total += residues[entering_residue(j, block_size)]
        run.append(total)
    return run


def paged_usage(manager) -> MemoryUsage:
    bs, pool = manager.block_size, manager.pool
    tokens = internal = reserved = per_seq_tokens = 0
    if pool.num_extra_refs == 0:     # nothing shared: sums over the tables (the simulator asks every step)
        seqs = manager.seqs     # every sequence it holds has a GPU table unless it is swapped out
        on_gpu = seqs.values() if len(seqs) == len(manager.tables) else map(seqs.__getitem__, manager.tables)
        computed = [seq.num_computed_tokens for seq in on_gpu]
        tokens = sum(computed)
        internal = sum(map(operator.mod, map(operator.neg, computed), repeat(bs)))     # each last block's rest
        reserved = sum(map(len, manager.tables.values())) * bs - tokens - internal
        per_seq_tokens = tokens
    else:
        # Private blocks are counted as they are met; shared ones once each, at their fullest.
        shared_fill: dict[int, int] = {}
        for seq_id, table in manager.tables.items():
            n = manager.seqs[seq_id].num_computed_tokens
            per_seq_tokens += n
            full, rem = divmod(n, bs)
            for block in table[:full]:
                if block.ref_count > 1:
                    shared_fill[block.block_id] = bs
                else:
                    tokens += bs
            for j, block in enumerate(table[full:]):
                f = rem if j == 0 else 0
                if block.ref_count > 1:
                    if shared_fill.get(block.block_id, -1) < f:
                        shared_fill[block.block_id] = f
                elif f:
                    tokens += f
                    internal += bs - f
                else:
                    reserved += bs
        for f in shared_fill.values():
            tokens += f
            if f == 0:
                reserved += bs
            else:
                internal += bs - f
    return MemoryUsage(capacity=pool.num_blocks * bs, tokens=tokens, internal=internal, reserved=reserved,
                       external=0, free=pool.num_free * bs, cached_free=pool.num_cached_free * bs,
                       shared_saved=per_seq_tokens - tokens)
