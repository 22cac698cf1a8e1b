"""StaticAllocator: the baseline that paging replaces. Each sequence reserves one contiguous region of the arena
for its longest possible length (max_model_len, or prompt + max_tokens), first fit, the moment it is admitted.

It implements `core.interface.KVAllocator`, as KVCacheManager does, so one scheduler and one workload run on either.
Its regions are runs of consecutive blocks, so its block tables are ranges and the real model runner works on it
unchanged.
No prefix sharing and no swapping (it finds no cached prefix and has no CPU pool): that is the point of the
contrast.
"""
from __future__ import annotations

import bisect

from pagedlab import events as ev
from pagedlab.core.accounting import MemoryUsage, blocks_entered
from pagedlab.sequence import Request, Sequence


class StaticAllocator:
    label = "static"
    enable_prefix_caching = False
    grows_on_demand = False         # a region covers the sequence's whole length from admission on
    num_cpu_blocks = 0

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, reservation: str = "max_model_len",
                 bus: ev.EventBus | None = None) -> None:
        self.bus = bus or ev.EventBus()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.reservation = reservation
        self.holes: list[tuple[int, int]] = [(0, num_blocks)]   # sorted (start, length) free runs
        self.regions: dict[int, tuple[int, int]] = {}            # seq_id -> (start, length)
        self.seqs: dict[int, Sequence] = {}
        self.spare: dict[int, list[tuple[int, int]]] = {}        # seq_id -> regions kept for the forks it will make
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = self.prefix_hits = 0               # nothing is ever looked up

    @property
    def num_free_blocks(self) -> int:
        return sum(length for _, length in self.holes)

    def region_blocks(self, request: Request) -> int:
        tokens = self.max_model_len if self.reservation == "max_model_len" else \
            request.max_total_tokens(self.max_model_len)
        return -(-tokens // self.block_size)

    def next_region_blocks(self, next_request_tokens: int | None = None) -> int:
        """The region the next request will reserve: a hole smaller than this is external fragmentation."""
        if self.reservation == "max_model_len" or next_request_tokens is None:
            return self.blocks_needed(self.max_model_len)
        return self.blocks_needed(next_request_tokens)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_to_finish(self, request: Request) -> int:
        return self.region_blocks(request) * request.sampling_params.n

    def holds(self, seq: Sequence) -> bool:
        return seq.seq_id in self.regions

    def block_table(self, seq: Sequence) -> list[int]:
        start, length = self.regions.get(seq.seq_id, (0, 0))
        return list(range(start, start + length))

    def blocks_held(self, seq: Sequence) -> list[int]:
        return self.block_table(seq) + [b for start, length in self.spare.get(seq.seq_id, ())
                                        for b in range(start, start + length)]

    def cpu_block_table(self, seq: Sequence) -> list[int]:
        return []

    def find_cached_prefix(self, request: Request, seq: Sequence) -> list:
        return []       # no prefix cache: every prompt is computed

    def on_computed(self, request: Request, seq: Sequence) -> None:
        raise TypeError("the static allocator caches no prefix (enable_prefix_caching is False)")

    def _first_fit(self, holes: list[tuple[int, int]], length: int) -> int | None:
        for i, (start, size) in enumerate(holes):
            if size >= length:
                holes[i] = (start + length, size - length)
                if size == length:
                    del holes[i]
                return start
        return None

    def _reserve(self, request: Request, seq: Sequence, num_new_tokens: int, prefix, keep_free: int):
        """(holes after, region starts, length) of a new sequence's reservation, or None if it does not fit. A
        sequence that forks reserves its samples' regions with its own."""
        if prefix:
            raise ValueError("the static allocator shares no blocks: a cached prefix cannot be given to it")
        length = self.region_blocks(request)
        copies = request.sampling_params.n if request.needs_fork else 1
        holes = list(self.holes)
        starts = [self._first_fit(holes, length) for _ in range(copies)]
        if None in starts or seq.num_computed_tokens + num_new_tokens > length * self.block_size \
                or self.num_free_blocks - copies * length < keep_free:
            return None
        return holes, starts, length

    def can_allocate(self, request: Request, seq: Sequence, num_new_tokens: int, prefix=(), keep_free: int = 0
                     ) -> bool:
        if seq.seq_id in self.regions:
            return seq.num_computed_tokens + num_new_tokens <= self.regions[seq.seq_id][1] * self.block_size
        return self._reserve(request, seq, num_new_tokens, prefix, keep_free) is not None

    def allocate_slots(self, request: Request, seq: Sequence, num_new_tokens: int, prefix=(), keep_free: int = 0
                       ) -> bool:
        """A new sequence takes its whole region now; later steps only write into it."""
        if seq.seq_id in self.regions:
            return seq.num_computed_tokens + num_new_tokens <= self.regions[seq.seq_id][1] * self.block_size
        reservation = self._reserve(request, seq, num_new_tokens, prefix, keep_free)
        if reservation is None:
            return False
        self.holes, starts, length = reservation
        self.regions[seq.seq_id] = (starts[0], length)
        self.seqs[seq.seq_id] = seq
        self.spare[seq.seq_id] = [(s, length) for s in starts[1:]]
        if self.bus.enabled:
            for start in starts:
                for block in range(start, start + length):
                    self.bus.emit(ev.BLOCK_ALLOCATED, block=block, seq=seq.seq_id)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child takes a region reserved at admission and gets a copy of the parent's computed KV."""
        start, length = self.spare[parent.seq_id].pop()
        self.regions[child.seq_id] = (start, length)
        self.seqs[child.seq_id] = child
        parent_start = self.regions[parent.seq_id][0]
        for i in range(self.blocks_needed(parent.num_computed_tokens)):
            self.pending_copies.append((parent_start + i, start + i))

    def _release(self, start: int, length: int) -> None:
        i = bisect.bisect(self.holes, (start, length))
        self.holes.insert(i, (start, length))
        # Merge with the neighbours so free space that touches becomes one hole again.
        if i + 1 < len(self.holes) and start + length == self.holes[i + 1][0]:
            self.holes[i] = (start, length + self.holes.pop(i + 1)[1])
        if i > 0 and self.holes[i - 1][0] + self.holes[i - 1][1] == start:
            prev_start, prev_len = self.holes.pop(i - 1)
            self.holes[i - 1] = (prev_start, prev_len + self.holes[i - 1][1])

    def free(self, seq: Sequence) -> None:
        """Its region and those kept for the forks it did not make."""
        regions = [self.regions.pop(seq.seq_id)] if seq.seq_id in self.regions else []
        regions += self.spare.pop(seq.seq_id, [])
        self.seqs.pop(seq.seq_id, None)
        for start, length in regions:
            self._release(start, length)
            if self.bus.enabled:
                for block in range(start, start + length):
                    self.bus.emit(ev.BLOCK_FREED, block=block, seq=seq.seq_id, device="gpu")

    def drop_pending_copies(self, seqs: list[Sequence]) -> dict[int, int]:
        owned = {b for s in seqs for b in self.block_table(s)}
        self.pending_copies = [(src, dst) for src, dst in self.pending_copies if dst not in owned]
        return {}

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # --- swapping: there is no CPU pool, so preemption recomputes -----------------------------------------------
    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return False

    def can_swap_in(self, seqs: list[Sequence], headroom: int = 0) -> bool:
        return False

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        raise ValueError("the static allocator has no CPU pool to swap to (can_swap_out is False)")

    swap_in = swap_out

    def blocks_needed_for_growth(self, seq: Sequence, num_new_tokens: int) -> int:
        held = self.regions.get(seq.seq_id, (0, 0))[1]
        return max(0, self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - held)

    # --- decode runs ------------------------------------------------------------------------------------------
    def plan_decode_run(self, seqs: list[Sequence], max_steps: int) -> list[int]:
        """Nothing is allocated: the sequences write into their regions, and the run ends where one ends (stepping
        would preempt there). A fork's pending copy must run first."""
        if self.pending_copies:
            return []
        bs, residues = self.block_size, [0] * self.block_size
        for seq in seqs:
            if seq.seq_id not in self.regions:
                return []
            max_steps = min(max_steps, self.regions[seq.seq_id][1] * bs - seq.num_computed_tokens)
            residues[seq.num_computed_tokens % bs] += 1
        return blocks_entered(residues, bs, max_steps)

    def advance_decode_run(self, seqs: list[Sequence], steps: int) -> None:
        for seq in seqs:
            seq.num_computed_tokens += steps

    def usage_after_decode(self, start: MemoryUsage, tokens: int, blocks_entered: int) -> MemoryUsage:
        """Each block entered was reserved already; its slots now hold the new tokens or wait inside it."""
        slots = blocks_entered * self.block_size
        return MemoryUsage(start.capacity, start.tokens + tokens, start.internal + slots - tokens,
                           start.reserved - slots, start.external, start.free, start.cached_free, start.shared_saved)

    # --- accounting and pictures ------------------------------------------------------------------------------
    def block_ref_counts(self) -> list[int]:
        counts = [0] * self.num_blocks
        for start, length in list(self.regions.values()) + [r for spares in self.spare.values() for r in spares]:
            counts[start:start + length] = [1] * length
        return counts

    def cached_blocks(self) -> set[int]:
        return set()

    def unusable_holes(self, next_request_tokens: int | None) -> list[tuple[int, int]]:
        need = self.next_region_blocks(next_request_tokens)
        return [(start, length) for start, length in self.holes if length < need]

    def usage(self, next_request_tokens: int | None = None) -> MemoryUsage:
        bs = self.block_size
        tokens = internal = reserved = 0
        for seq_id, (_, length) in self.regions.items():
            n = self.seqs[seq_id].num_computed_tokens
            touched = -(-n // bs)
            tokens += n
            internal += touched * bs - n
            reserved += (length - touched) * bs
        reserved += sum(length for spares in self.spare.values() for _, length in spares) * bs
        external = sum(length for _, length in self.unusable_holes(next_request_tokens)) * bs
        free = self.num_free_blocks * bs - external
        return MemoryUsage(capacity=self.num_blocks * bs, tokens=tokens, internal=internal, reserved=reserved,
                           external=external, free=free)
