"""A picture of KV memory at one instant: every sequence's block table and every block's owners and fill.
The lab draws it; tests check it against the allocator's own accounting."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockInfo:
    block_id: int
    ref_count: int
    owners: list[str] = field(default_factory=list)     # "request_id/seq_index" of each holder
    filled: int = 0                                      # slots holding a token
    cached: bool = False                                 # findable by prefix hash


@dataclass
class SeqInfo:
    request_id: str
    seq_index: int
    seq_id: int
    status: str
    num_tokens: int
    num_computed_tokens: int
    block_table: list[int]
    cpu_block_table: list[int]


@dataclass
class Snapshot:
    step: int
    allocator: str
    block_size: int
    num_blocks: int
    blocks: list[BlockInfo]
    seqs: list[SeqInfo]
    usage: dict

    def block_frame(self):
        import pandas as pd
        return pd.DataFrame([vars(b) for b in self.blocks])

    def table_frame(self):
        """One row per (sequence, logical block): the block table, ready to pivot into a map."""
        import pandas as pd
        rows = [{"request_id": s.request_id, "seq_index": s.seq_index, "logical_block": i, "physical_block": b,
                 "ref_count": self.blocks[b].ref_count, "cached": self.blocks[b].cached}
                for s in self.seqs for i, b in enumerate(s.block_table)]
        return pd.DataFrame(rows)


def take_snapshot(engine) -> Snapshot:
    kv, sched = engine.kv, engine.scheduler
    bs = kv.block_size
    cached = kv.cached_blocks()
    blocks = [BlockInfo(i, refs, cached=i in cached) for i, refs in enumerate(kv.block_ref_counts())]
    seqs = []
    requests = list(sched.running) + list(sched.swapped) + list(sched.waiting)
    for request in requests:
        for index, seq in enumerate(request.seqs):
            table = kv.block_table(seq)
            seqs.append(SeqInfo(request.request_id, index, seq.seq_id, request.status.value, seq.num_tokens,
                                seq.num_computed_tokens, table, kv.cpu_block_table(seq)))
            for j, block_id in enumerate(table):
                info = blocks[block_id]
                info.owners.append(f"{request.request_id}/{index}")
                info.filled = max(info.filled, min(bs, max(0, seq.num_computed_tokens - j * bs)))
    return Snapshot(sched.step_id, kv.label, bs, kv.num_blocks, blocks, seqs, engine.memory_usage().as_dict())
