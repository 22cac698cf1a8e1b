"""InputBatch: the worker's persistent copy of every sequence it was sent (vLLM V1's persistent batch,
`gpu_input_batch.py` + `block_table.py`).

A row per sequence holds its token ids, its block table and what the sampler needs (ids, SamplingParams). Rows are
filled from a SchedulerOutput: new sequences whole, held ones by the diffs (tokens and blocks appended, an entry
copy-on-write replaced), and freed when the scheduler says a sequence ended or was preempted. The arrays are
reused from step to step and grow (doubling) when a sequence outgrows them, so a step's inputs are gathered from
them with numpy, without touching any scheduler object.
"""
from __future__ import annotations

import itertools

import numpy as np

from pagedlab.layers.sampler import is_plain_greedy
from pagedlab.sampling_params import SamplingParams
from pagedlab.sched_output import SchedulerOutput


class InputBatch:
    def __init__(self, num_rows: int = 16, max_tokens: int = 256, max_blocks: int = 16) -> None:
        self.token_ids = np.zeros((num_rows, max_tokens), np.int64)
        self.num_tokens = np.zeros(num_rows, np.int64)
        self.block_table = np.zeros((num_rows, max_blocks), np.int32)
        self.num_blocks = np.zeros(num_rows, np.int64)
        self.num_prompt_tokens = np.zeros(num_rows, np.int64)
        self.plain_greedy = np.zeros(num_rows, bool)      # its params leave nothing to do but an argmax
        self.req_ids: list[str | None] = [None] * num_rows
        self.seq_indexes = [0] * num_rows
        self.params: list[SamplingParams | None] = [None] * num_rows
        self.prompt_logprobs_start = [0] * num_rows
        self.row_of: dict[int, int] = {}               # seq_id -> row
        self.prompt_logprob_seqs: set[int] = set()     # sequences whose prompt logprobs are wanted
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.row_of)

    # --- from the scheduler's diffs -------------------------------------------------------------------------
    def update(self, out: SchedulerOutput) -> None:
        """Forget what ended or was preempted, add the new sequences, apply the held ones' diffs."""
        for seq_id in (*out.finished_seq_ids, *out.preempted_seq_ids):
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self.params[row] = self.req_ids[row] = None
                self.block_table[row, :self.num_blocks[row]] = 0      # prepare() reads past a row's blocks
                self.num_tokens[row] = self.num_blocks[row] = 0
                self.prompt_logprob_seqs.discard(seq_id)
                self._free_rows.append(row)
        for new in out.new_seqs:
            row = self._take_row(new.seq_id)
            self._set_tokens(row, 0, new.token_ids)
            self._set_blocks(row, 0, new.block_ids)
            self.num_prompt_tokens[row] = new.num_prompt_tokens
            self.req_ids[row], self.seq_indexes[row], self.params[row] = new.req_id, new.seq_index, new.sampling_params
            self.prompt_logprobs_start[row] = new.prompt_logprobs_start
            self.plain_greedy[row] = is_plain_greedy(new.sampling_params)
            if new.sampling_params.prompt_logprobs is not None and new.seq_index == 0:
                self.prompt_logprob_seqs.add(new.seq_id)
        for seq_id, index, block_id in out.replaced_block_ids:
            self.block_table[self.row_of[seq_id], index] = block_id
        cached = out.cached_seqs
        if cached.seq_ids:
            self._append_tokens(self.rows(cached.seq_ids), cached.new_token_ids)
            for seq_id, blocks in zip(cached.seq_ids, cached.new_block_ids):
                if blocks:
                    row = self.row_of[seq_id]
                    self._set_blocks(row, int(self.num_blocks[row]), blocks)

    def rows(self, seq_ids: list[int]) -> np.ndarray:
        row_of = self.row_of
        return np.fromiter((row_of[s] for s in seq_ids), np.int64, len(seq_ids))

    def block_ids(self, seq_id: int) -> list[int]:
        row = self.row_of[seq_id]
        return self.block_table[row, :self.num_blocks[row]].tolist()

    def reserve_tokens(self, width: int) -> None:
        """Room for `width` tokens in every row."""
        self._widen("token_ids", width)

    # --- storage --------------------------------------------------------------------------------------------
    def _take_row(self, seq_id: int) -> int:
        if seq_id in self.row_of:
            raise ValueError(f"sequence {seq_id} is already in the batch: the scheduler sent it as new twice")
        if not self._free_rows:
            self._grow_rows()
        row = self.row_of[seq_id] = self._free_rows.pop()
        return row

    def _grow_rows(self) -> None:
        old = len(self.num_tokens)
        for name in ("token_ids", "num_tokens", "block_table", "num_blocks", "num_prompt_tokens", "plain_greedy"):
            array = getattr(self, name)
            grown = np.zeros((2 * old, *array.shape[1:]), array.dtype)
            grown[:old] = array
            setattr(self, name, grown)
        for name in ("req_ids", "params"):
            getattr(self, name).extend([None] * old)
        self.seq_indexes.extend([0] * old)
        self.prompt_logprobs_start.extend([0] * old)
        self._free_rows.extend(range(2 * old - 1, old - 1, -1))

    def _widen(self, name: str, width: int) -> np.ndarray:
        array = getattr(self, name)
        if width > array.shape[1]:
            grown = np.zeros((array.shape[0], max(width, 2 * array.shape[1])), array.dtype)
            grown[:, :array.shape[1]] = array
            setattr(self, name, grown)
            array = grown
        return array

    def _append_tokens(self, rows: np.ndarray, new_token_ids: list[list[int]]) -> None:
        """Each row's new tokens after its others, in one scatter (a decode step: one token a row)."""
        counts = np.fromiter(map(len, new_token_ids), np.int64, len(rows))
        total = int(counts.sum())
        if not total:
            return
        starts = self.num_tokens[rows]
        ends = starts + counts
        token_ids = self._widen("token_ids", int(ends.max()))
        if total == len(rows) and counts.max() == 1:
            token_ids[rows, starts] = [tokens[0] for tokens in new_token_ids]
        else:
            firsts = np.cumsum(counts) - counts
            positions = np.arange(total) + np.repeat(starts - firsts, counts)
            token_ids[np.repeat(rows, counts), positions] = np.fromiter(
                itertools.chain.from_iterable(new_token_ids), np.int64, total)
        self.num_tokens[rows] = ends

    def _set_tokens(self, row: int, start: int, tokens: list[int]) -> None:
        end = start + len(tokens)
        self._widen("token_ids", end)[row, start:end] = tokens
        self.num_tokens[row] = end

    def _set_blocks(self, row: int, start: int, blocks: list[int]) -> None:
        end = start + len(blocks)
        self._widen("block_table", end)[row, start:end] = blocks
        self.num_blocks[row] = end
