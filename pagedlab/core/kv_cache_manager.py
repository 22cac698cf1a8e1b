"""KVCacheManager: per-sequence block tables over a BlockPool — allocation, prefix caching, forks with
copy-on-write, and swapping to a CPU pool. It decides which physical blocks hold which tokens; it never touches
the KV tensors themselves: copies and swaps are handed to the executor as (src, dst) block pairs.
It implements `core.interface.KVAllocator`.
"""
from __future__ import annotations

import bisect

from pagedlab import events as ev
from pagedlab.core.accounting import MemoryUsage, blocks_entered, entering_residue, paged_usage
from pagedlab.core.block_pool import Block, BlockPool
from pagedlab.sequence import Request, Sequence


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...], extra_key: object = None) -> int:
    """Hash chain of a full block: it names the whole prefix up to and including this block."""
    return hash((parent_hash, token_ids, extra_key))


class KVCacheManager:
    label = "paged"
    grows_on_demand = True

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_cpu_blocks: int = 0, bus: ev.EventBus | None = None, max_model_len: int | None = None) -> None:
        self.bus = bus or ev.EventBus()
        self.block_size = block_size
        self.max_model_len = num_blocks * block_size if max_model_len is None else max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, self.bus, "gpu")
        self.cpu_pool = BlockPool(num_cpu_blocks, self.bus, "cpu")
        self.tables: dict[int, list[Block]] = {}        # seq_id -> GPU blocks
        self.cpu_tables: dict[int, list[Block]] = {}    # seq_id -> CPU blocks while swapped out
        self.seqs: dict[int, Sequence] = {}
        self.block_hashes: dict[int, list[int]] = {}    # seq_id -> hash chain of its registered full blocks
        self.pending_copies: list[tuple[int, int]] = []
        # Blocks that are the source of a pending copy must not be reused before the executor copies them.
        self.copy_sources: set[int] = set()
        self.deferred_release: list[Block] = []
        self.prefix_queries = 0                         # prompt tokens looked up in the cache
        self.prefix_hits = 0                            # ... and found there

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_cpu_blocks(self) -> int:
        return self.cpu_pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_to_finish(self, request: Request) -> int:
        """The n samples share the prompt's full blocks; each grows its own to the longest it may get."""
        longest, n = request.max_total_tokens(self.max_model_len), request.sampling_params.n
        shared = request.num_prompt_tokens // self.block_size if n > 1 else 0
        return shared + n * (self.blocks_needed(longest) - shared)

    def holds(self, seq: Sequence) -> bool:
        return seq.seq_id in self.seqs

    def block_table(self, seq: Sequence) -> list[int]:
        return [b.block_id for b in self.tables.get(seq.seq_id, ())]

    blocks_held = block_table       # forks share their parent's blocks: nothing is reserved for them

    def cpu_block_table(self, seq: Sequence) -> list[int]:
        return [b.block_id for b in self.cpu_tables.get(seq.seq_id, ())]

    # --- prefix cache -------------------------------------------------------------------------------------
    def find_cached_prefix(self, request: Request, seq: Sequence) -> list[Block]:
        """Cached blocks that hold the longest prefix of `seq`, leaving at least one token to compute (its
        logits are needed). Only for a sequence with nothing computed yet. A request that wants prompt logprobs
        reads nothing from the cache (vLLM V1 does the same): its cached rows would have no logits."""
        if (not self.enable_prefix_caching or seq.num_computed_tokens
                or request.sampling_params.prompt_logprobs is not None):
            return []
        hits, parent = [], None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = hash_block(parent, tokens, request.cache_salt)
            block = self.pool.lookup(parent, tokens)
            if block is None:
                break
            hits.append(block)
        return hits

    def _register_full_blocks(self, request: Request, seq: Sequence) -> None:
        table, hashes = self.tables[seq.seq_id], self.block_hashes.setdefault(seq.seq_id, [])
        bs, num_full = self.block_size, seq.num_computed_tokens // self.block_size
        for i in range(len(hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens, request.cache_salt))
            self.pool.register(table[i], hashes[-1], tokens)

    # --- allocation ---------------------------------------------------------------------------------------
    def _demand(self, table: list[Block], seq: Sequence, num_new_tokens: int, prefix) -> tuple[int, bool, int]:
        """(new blocks, whether the first write copies a shared block, cached blocks revived from the free queue)."""
        num_computed = seq.num_computed_tokens + len(prefix) * self.block_size
        num_new_blocks = self.blocks_needed(num_computed + num_new_tokens) - len(table) - len(prefix)
        first_write = num_computed // self.block_size
        needs_cow = first_write < len(table) and table[first_write].ref_count > 1
        return num_new_blocks, needs_cow, sum(1 for b in prefix if b.ref_count == 0)

    def can_allocate(self, request: Request, seq: Sequence, num_new_tokens: int, prefix: list[Block] = (),
                     keep_free: int = 0) -> bool:
        return sum(self._demand(self.tables.get(seq.seq_id, []), seq, num_new_tokens, prefix)) \
            <= self.pool.num_free - keep_free

    def allocate_slots(self, request: Request, seq: Sequence, num_new_tokens: int,
                       prefix: list[Block] = (), keep_free: int = 0) -> bool:
        """Give `seq` slots for its next `num_new_tokens` tokens (after taking `prefix` from the cache).
        False, with nothing changed, when the free blocks don't suffice or would leave fewer than `keep_free`.
        A new sequence's first allocation counts its prompt as a prefix-cache query."""
        table = self.tables.get(seq.seq_id)
        bs = self.block_size
        if table is not None and not prefix:
            computed = seq.num_computed_tokens
            if computed + num_new_tokens <= len(table) * bs and table[computed // bs].ref_count == 1:
                return True     # the common decode step: room left in a private last block
        num_new_blocks, needs_cow, revived = self._demand(table or [], seq, num_new_tokens, prefix)
        if num_new_blocks + needs_cow + revived > self.pool.num_free - keep_free:
            return False
        if table is None:
            table = self.tables[seq.seq_id] = []
            self.seqs[seq.seq_id] = seq
            if self.enable_prefix_caching:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += len(prefix) * bs
        num_computed = seq.num_computed_tokens + len(prefix) * bs
        first_write = num_computed // bs
        on = self.bus.enabled
        if prefix:
            for block in prefix:
                self.pool.take(block)
                table.append(block)
                if on:
                    self.bus.emit(ev.BLOCK_SHARED, block=block.block_id, seq=seq.seq_id, ref_count=block.ref_count)
            seq.num_computed_tokens = num_computed
            self.block_hashes[seq.seq_id] = [b.block_hash for b in prefix]
            request.num_cached_tokens = num_computed
            if on:
                self.bus.emit(ev.PREFIX_HIT, request=request, tokens=num_computed)
        if needs_cow:
            shared = table[first_write]
            private = self.pool.allocate()
            self.pool.release(shared)
            table[first_write] = private
            self.pending_copies.append((shared.block_id, private.block_id))
            self.copy_sources.add(shared.block_id)
            if on:
                self.bus.emit(ev.BLOCK_COW, block=shared.block_id, dst=private.block_id, seq=seq.seq_id)
        for _ in range(num_new_blocks):
            block = self.pool.allocate()
            table.append(block)
            if on:
                self.bus.emit(ev.BLOCK_ALLOCATED, block=block.block_id, seq=seq.seq_id)
        return True

    def on_computed(self, request: Request, seq: Sequence) -> None:
        """After a step advanced `seq.num_computed_tokens` (prefix caching on): newly filled blocks become findable."""
        self._register_full_blocks(request, seq)

    def _release(self, pool: BlockPool, block: Block) -> None:
        if block.ref_count == 1 and pool is self.pool and block.block_id in self.copy_sources:
            self.deferred_release.append(block)
        else:
            pool.release(block)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent`; the first write into a shared partial block copies it."""
        table = self.tables[child.seq_id] = list(self.tables[parent.seq_id])
        self.seqs[child.seq_id] = child
        self.block_hashes[child.seq_id] = list(self.block_hashes.get(parent.seq_id, ()))
        for block in table:
            self.pool.take(block)
            if self.bus.enabled:
                self.bus.emit(ev.BLOCK_SHARED, block=block.block_id, seq=child.seq_id, ref_count=block.ref_count)

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq`, GPU and CPU; the tail first, so cached prefixes outlive suffixes."""
        on, copying = self.bus.enabled, bool(self.copy_sources)    # without pending copies no release waits
        for pool, tables in ((self.pool, self.tables), (self.cpu_pool, self.cpu_tables)):
            for block in reversed(tables.pop(seq.seq_id, ())):
                if copying:
                    self._release(pool, block)
                else:
                    pool.release(block)
                if on and block.ref_count == 0:
                    self.bus.emit(ev.BLOCK_FREED, block=block.block_id, seq=seq.seq_id, device=pool.device)
        self.seqs.pop(seq.seq_id, None)
        self.block_hashes.pop(seq.seq_id, None)

    def drop_pending_copies(self, seqs: list[Sequence]) -> dict[int, int]:
        """Forget the copies into blocks of sequences being preempted; returns {dst: src} so a swap-out can
        take the source's contents instead of the never-filled destination."""
        owned = {b.block_id for s in seqs for b in self.tables.get(s.seq_id, ())}
        aliases = {dst: src for src, dst in self.pending_copies if dst in owned}
        self.pending_copies = [(src, dst) for src, dst in self.pending_copies if dst not in owned]
        return aliases

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """The step's copy-on-write pairs, for the executor; blocks held back for them are released now."""
        copies, self.pending_copies = self.pending_copies, []
        self.copy_sources.clear()
        for block in self.deferred_release:
            self.pool.release(block)
        self.deferred_release.clear()
        return copies

    # --- swapping -----------------------------------------------------------------------------------------
    def _distinct(self, tables: dict[int, list[Block]], seqs: list[Sequence]) -> dict[int, Block]:
        return {b.block_id: b for s in seqs for b in tables.get(s.seq_id, ())}

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return len(self._distinct(self.tables, seqs)) <= self.cpu_pool.num_free

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move the sequences' blocks to the CPU pool, keeping blocks shared among them shared there."""
        return self._move(seqs, self.tables, self.cpu_tables, self.pool, self.cpu_pool, ev.BLOCK_SWAPPED_OUT)

    def can_swap_in(self, seqs: list[Sequence], headroom: int = 0) -> bool:
        return len(self._distinct(self.cpu_tables, seqs)) + headroom <= self.pool.num_free

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        return self._move(seqs, self.cpu_tables, self.tables, self.cpu_pool, self.pool, ev.BLOCK_SWAPPED_IN)

    def blocks_needed_for_growth(self, seq: Sequence, num_new_tokens: int) -> int:
        held = len(self.tables.get(seq.seq_id) or self.cpu_tables.get(seq.seq_id, ()))
        return max(0, self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - held) + 1

    def _move(self, seqs, src_tables, dst_tables, src_pool, dst_pool, kind) -> list[tuple[int, int]]:
        mapping: dict[int, Block] = {}
        for seq in seqs:
            if seq.seq_id not in src_tables:
                continue        # a sequence not started yet (its request was admitted with part of the batch)
            new_table = []
            for block in src_tables.pop(seq.seq_id):
                if block.block_id not in mapping:
                    mapping[block.block_id] = dst_pool.allocate()
                    if self.bus.enabled:
                        self.bus.emit(kind, block=block.block_id, dst=mapping[block.block_id].block_id,
                                      seq=seq.seq_id)
                else:
                    dst_pool.take(mapping[block.block_id])
                new_table.append(mapping[block.block_id])
                self._release(src_pool, block)
            dst_tables[seq.seq_id] = new_table
        return [(src, dst.block_id) for src, dst in mapping.items()]

    # --- decode runs --------------------------------------------------------------------------------------
    def plan_decode_run(self, seqs: list[Sequence], max_steps: int) -> list[int]:
        """Sequence s, with c tokens computed, writes position c + j - 1 at step j: a new block each time that
        position starts one. Nothing may be shared (no copy-on-write), cached (no registration) or pending."""
        if self.enable_prefix_caching or self.pending_copies or self.pool.num_extra_refs:
            return []
        bs, residues, tables = self.block_size, [0] * self.block_size, self.tables
        for seq in seqs:
            c = seq.num_computed_tokens
            if len(tables.get(seq.seq_id, ())) != -(-c // bs):
                return []
            residues[c % bs] += 1
        run, free = blocks_entered(residues, bs, max_steps), self.pool.num_free
        return run if not run or run[-1] <= free else run[:bisect.bisect_right(run, free)]

    def advance_decode_run(self, seqs: list[Sequence], steps: int) -> None:
        """Blocks go out step by step, in batch order within a step, as stepping takes them. The run publishes no
        block events: the simulator applies runs only while nobody listens for them."""
        bs, tables, allocate = self.block_size, self.tables, self.pool.allocate
        by_residue: list[list[list[Block]]] = [[] for _ in range(bs)]
        for seq in seqs:
            by_residue[seq.num_computed_tokens % bs].append(tables[seq.seq_id])
            seq.num_computed_tokens += steps
        for j in range(1, steps + 1):
            for table in by_residue[entering_residue(j, bs)]:
                table.append(allocate())

    def usage_after_decode(self, start: MemoryUsage, tokens: int, blocks_entered: int) -> MemoryUsage:
        """Each block entered came from the free pool; its slots hold the new tokens or wait inside it."""
        slots = blocks_entered * self.block_size
        return MemoryUsage(start.capacity, start.tokens + tokens, start.internal + slots - tokens, start.reserved,
                           start.external, start.free - slots, start.cached_free, start.shared_saved)

    # --- accounting and pictures ----------------------------------------------------------------------------
    def usage(self, next_request_tokens: int | None = None) -> MemoryUsage:
        """Any free block serves any request, so the next request's size changes nothing here."""
        return paged_usage(self)

    def block_ref_counts(self) -> list[int]:
        return [b.ref_count for b in self.pool.blocks]

    def cached_blocks(self) -> set[int]:
        return {b.block_id for b in self.pool.cached.values()}

    def unusable_holes(self, next_request_tokens: int | None) -> list[tuple[int, int]]:
        return []       # a request takes any free blocks, wherever they are: no external fragmentation

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
