"""KVAllocator: what the scheduler, the simulator and the lab may ask of a KV allocator, and nothing else.

Two implementations: the paged `KVCacheManager` (blocks on demand, prefix caching, forks with copy-on-write,
swapping) and the contiguous `StaticAllocator` (one max-length region per sequence, no caching, no swapping: the
baseline). What one of them cannot do it says through a capability (`enable_prefix_caching`, `grows_on_demand`,
`num_cpu_blocks`), and answers the call the way an allocator without that feature would: no cached prefix, no
room to swap. Callers never branch on which allocator they hold nor read its tables; `label` is for display only.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from pagedlab import events as ev
from pagedlab.core.accounting import MemoryUsage
from pagedlab.sequence import Request, Sequence


@runtime_checkable
class KVAllocator(Protocol):
    label: str                      # "paged" | "static": what the lab and the metrics call it
    bus: ev.EventBus
    block_size: int
    enable_prefix_caching: bool     # False: find_cached_prefix finds nothing and on_computed is never needed
    prefix_queries: int             # prompt tokens looked up in the prefix cache ...
    prefix_hits: int                # ... and found there

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def num_cpu_blocks(self) -> int:
        """Size of the CPU swap pool; 0: preemption always recomputes."""

    @property
    def grows_on_demand(self) -> bool:
        """Whether running sequences take new blocks as they grow (paged), so admission must leave them room;
        False when every sequence reserved its whole length up front (static)."""

    def blocks_needed(self, num_tokens: int) -> int: ...

    def blocks_to_finish(self, request: Request) -> int:
        """Blocks the request holds at its longest, alone in the cache (all its samples at their longest):
        more than `num_blocks` and it can never finish."""

    def holds(self, seq: Sequence) -> bool:
        """Whether any block (GPU or CPU) is held for `seq`."""

    def block_table(self, seq: Sequence) -> list[int]: ...

    # --- admission and growth ---
    def find_cached_prefix(self, request: Request, seq: Sequence) -> list: ...

    def can_allocate(self, request: Request, seq: Sequence, num_new_tokens: int, prefix: list = (),
                     keep_free: int = 0) -> bool:
        """Whether allocate_slots with these arguments would succeed; changes nothing."""

    def allocate_slots(self, request: Request, seq: Sequence, num_new_tokens: int, prefix: list = (),
                       keep_free: int = 0) -> bool:
        """Slots for the next `num_new_tokens` tokens of `seq` (after taking `prefix` from the cache); False,
        with nothing changed, if that would leave fewer than `keep_free` blocks free."""

    def on_computed(self, request: Request, seq: Sequence) -> None:
        """After a step computed tokens of `seq` (called only with enable_prefix_caching)."""

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` starts as a copy of `parent`'s KV."""

    def free(self, seq: Sequence) -> None:
        """Return every block held for `seq` (and for forks it has not made yet)."""

    def drop_pending_copies(self, seqs: list[Sequence]) -> dict[int, int]: ...

    def take_pending_copies(self) -> list[tuple[int, int]]: ...

    # --- swapping (a pool of num_cpu_blocks) ---
    def can_swap_out(self, seqs: list[Sequence]) -> bool: ...

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]: ...

    def can_swap_in(self, seqs: list[Sequence], headroom: int = 0) -> bool: ...

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]: ...

    def blocks_needed_for_growth(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks `seq` takes to compute `num_new_tokens` more tokens, on top of those it holds (GPU or CPU),
        one more where its first write may be a copy-on-write."""

    # --- decode runs (the simulator applies many regular decode steps at once) ---
    def plan_decode_run(self, seqs: list[Sequence], max_steps: int) -> list[int]:
        """For up to `max_steps` decode steps of `seqs` (each computes one token a step): how many blocks the
        sequences have entered after each step, cumulative, one entry per step served exactly as allocate_slots
        would serve it step by step; it stops before a step it could not serve. [] when a run cannot be applied at
        once (prefix caching, shared blocks, a pending copy, a sequence not decoding)."""

    def advance_decode_run(self, seqs: list[Sequence], steps: int) -> None:
        """Apply `steps` steps of that run: the sequences' next tokens become computed in their slots, and their
        new blocks are taken in the order stepping takes them."""

    def usage_after_decode(self, start: MemoryUsage, tokens: int, blocks_entered: int) -> MemoryUsage:
        """The accounting after decode steps added `tokens` computed tokens that entered `blocks_entered` new
        blocks, from `start` (nothing freed in between)."""

    # --- accounting and pictures ---
    def usage(self, next_request_tokens: int | None = None) -> MemoryUsage: ...

    def blocks_held(self, seq: Sequence) -> list[int]:
        """Every GPU block held for `seq`: its block table, then any reserved for forks it has not made yet."""

    def cpu_block_table(self, seq: Sequence) -> list[int]:
        """The CPU blocks of a swapped-out `seq` ([] when it is on the GPU)."""

    def block_ref_counts(self) -> list[int]:
        """The number of holders of each GPU block."""

    def cached_blocks(self) -> set[int]:
        """GPU blocks findable by prefix hash."""

    def unusable_holes(self, next_request_tokens: int | None) -> list[tuple[int, int]]:
        """(start, length) of free runs too small for the next request: external fragmentation."""
