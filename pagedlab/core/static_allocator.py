"""StaticAllocator: the baseline that paging replaces. Each sequence reserves one contiguous region of the arena
for its longest possible length (max_model_len, or prompt + max_tokens), first fit, the moment it is admitted.

It answers the same calls as KVCacheManager, so one scheduler and one workload run on either. Its regions are
runs of consecutive blocks, so its block tables are ranges and the real model runner works on it unchanged.
No prefix sharing and no swapping: that is the point of the contrast.
"""
from __future__ import annotations

import bisect

from pagedlab import events as ev
from pagedlab.core.accounting import MemoryUsage
from pagedlab.sequence import Request, Sequence


class StaticAllocator:
    kind = "static"
    enable_prefix_caching = False
    prefix_queries = prefix_hits = 0

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, reservation: str = "max_model_len",
                 bus: ev.EventBus | None = None, **_ignored) -> None:
        self.bus = bus or ev.EventBus()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.reservation = reservation
        self.holes: list[tuple[int, int]] = [(0, num_blocks)]   # sorted (start, length) free runs
        self.regions: dict[int, tuple[int, int]] = {}            # seq_id -> (start, length)
        self.seqs: dict[int, Sequence] = {}
        self.spare: dict[str, list[tuple[int, int]]] = {}        # request_id -> regions kept for its forks
        self.pending_copies: list[tuple[int, int]] = []

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

    def block_table(self, seq: Sequence) -> list[int]:
        start, length = self.regions.get(seq.seq_id, (0, 0))
        return list(range(start, start + length))

    def find_cached_prefix(self, request: Request, seq: Sequence) -> list:
        return []

    def count_prefix_query(self, seq: Sequence, prefix: list) -> None:
        pass

    def _first_fit(self, holes: list[tuple[int, int]], length: int) -> int | None:
        for i, (start, size) in enumerate(holes):
            if size >= length:
                holes[i] = (start + length, size - length)
                if size == length:
                    del holes[i]
                return start
        return None

    def allocate_slots(self, request: Request, seq: Sequence, num_new_tokens: int, prefix=(), keep_free: int = 0
                       ) -> bool:
        """A new sequence takes its whole region now (keep_free does not apply: a region is all or nothing)."""
        if seq.seq_id in self.regions:
            _, length = self.regions[seq.seq_id]
            return seq.num_computed_tokens + num_new_tokens <= length * self.block_size
        length = self.region_blocks(request)
        copies = request.sampling_params.n if request.needs_fork else 1
        holes = list(self.holes)
        starts = [self._first_fit(holes, length) for _ in range(copies)]
        if None in starts or seq.num_computed_tokens + num_new_tokens > length * self.block_size:
            return False
        self.holes = holes
        self.regions[seq.seq_id] = (starts[0], length)
        self.seqs[seq.seq_id] = seq
        self.spare[request.request_id] = [(s, length) for s in starts[1:]]
        if self.bus.enabled:
            for start in starts:
                for block in range(start, start + length):
                    self.bus.emit(ev.BLOCK_ALLOCATED, block=block, seq=seq.seq_id)
        return True

    def fork(self, parent: Sequence, child: Sequence, request: Request) -> None:
        """The child takes a region reserved at admission and gets a copy of the parent's computed KV."""
        start, length = self.spare[request.request_id].pop()
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
        region = self.regions.pop(seq.seq_id, None)
        self.seqs.pop(seq.seq_id, None)
        if region is not None:
            self._release(*region)
            if self.bus.enabled:
                for block in range(region[0], region[0] + region[1]):
                    self.bus.emit(ev.BLOCK_FREED, block=block, seq=seq.seq_id, device="gpu")

    def free_request(self, request: Request) -> None:
        for region in self.spare.pop(request.request_id, ()):
            self._release(*region)

    def drop_pending_copies(self, seqs: list[Sequence]) -> dict[int, int]:
        owned = {b for s in seqs for b in self.block_table(s)}
        self.pending_copies = [(src, dst) for src, dst in self.pending_copies if dst not in owned]
        return {}

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def can_swap_out(self, seqs) -> bool:
        return False

    def reset_prefix_cache(self) -> None:
        pass

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
        need = self.next_region_blocks(next_request_tokens)
        external = sum(length for _, length in self.holes if length < need) * bs
        free = self.num_free_blocks * bs - external
        return MemoryUsage(capacity=self.num_blocks * bs, tokens=tokens, internal=internal, reserved=reserved,
                           external=external, free=free)
