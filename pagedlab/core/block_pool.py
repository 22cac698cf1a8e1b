"""BlockPool: the physical KV blocks of one device, their reference counts, the free queue and the prefix cache.

A block whose last reference goes away joins the back of the free queue but keeps its prefix hash, so a later
request with the same prefix can take it back (a prefix-cache hit). Allocation takes from the front: the least
recently freed cached block is the one evicted.
"""
from __future__ import annotations

from collections import OrderedDict

from pagedlab import events as ev


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None   # kept to verify a hash hit

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, cached={self.block_hash is not None})"


class BlockPool:
    def __init__(self, num_blocks: int, bus: ev.EventBus | None = None, device: str = "gpu") -> None:
        self.num_blocks = num_blocks
        self.device = device
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, Block] = {}
        self.num_extra_refs = 0         # references beyond the first, summed over blocks: 0 means nothing is shared
        self.num_cached_free = 0        # free blocks that still hold a cached prefix
        self.bus = bus or ev.EventBus()

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self) -> Block:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            self.num_cached_free -= 1
            del self.cached[block.block_hash]
            block.block_hash = block.token_ids = None
            if self.bus.enabled:
                self.bus.emit(ev.BLOCK_EVICTED, block=block_id, device=self.device)
        block.ref_count = 1
        return block

    def take(self, block: Block) -> None:
        """Add a reference to a block another sequence holds, or revive a cached block from the free queue."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
            self.num_cached_free -= block.block_hash is not None
        else:
            self.num_extra_refs += 1
        block.ref_count += 1

    def release(self, block: Block) -> None:
        assert block.ref_count > 0, f"{block} released more often than taken"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block.block_id] = None
            self.num_cached_free += block.block_hash is not None
        else:
            self.num_extra_refs -= 1

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> Block | None:
        block = self.cached.get(block_hash)
        return block if block is not None and block.token_ids == token_ids else None

    def register(self, block: Block, block_hash: int, token_ids: tuple[int, ...]) -> None:
        """Make a full, computed block findable by its prefix hash (first writer wins)."""
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash, block.token_ids = block_hash, token_ids
            self.cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            block.block_hash = block.token_ids = None
        self.cached.clear()
        self.num_cached_free = 0
