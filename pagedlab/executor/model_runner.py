"""ModelRunner: the executor that runs real forward passes over the paged KV cache.

Each step it applies the scheduler's plain-data output to its persistent batch (input_batch.py), performs the
block moves, packs every scheduled sequence's new tokens into one flat batch (no padding) from that batch,
publishes the batch layout to the attention layers, runs the model, and samples from the last position of each
sequence that reaches its end. Decode batches replay CUDA graphs on the GPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from pagedlab.config import EngineConfig
from pagedlab.distributed.parallel_state import get_tensor_parallel_world_size
from pagedlab.executor.async_output import AsyncOutput
from pagedlab.executor.input_batch import InputBatch
from pagedlab.executor.warmup import warm_up
from pagedlab.kernels import copy_blocks, swap_blocks
from pagedlab.layers.attention import AttentionMetadata, PagedAttention, set_attention_metadata
from pagedlab.layers.logits_processors import GrammarBitmask
from pagedlab.layers.quantization.kv_cache import calibrate_kv_scales
from pagedlab.layers.prompt_logprobs import (PromptLogprobSpan, StepLogits, attach_prompt_logprobs, lm_head,
                                             logit_rows_per_pass, prompt_logprob_range)
from pagedlab.layers.sampler import SampledTokens, Sampler, SamplingRow
from pagedlab.sched_output import SampleResult, SchedulerOutput
from pagedlab.models.loader import (eos_token_ids, load_hf_config, load_model, model_max_length, resolve_device,
                                    resolve_dtype)

GiB = 1 << 30
MAX_GRAPH_BATCH = 512      # larger decode batches run eagerly


@dataclass(frozen=True)
class HostBatch:
    """One step's inputs packed on the host by ModelRunner.prepare: small, and picklable, which is how rank 0 of a
    tensor-parallel group sends a step to the others.

    longs (int64): input_ids, positions, slot_mapping, then the rows whose logits are sampled and the prompt rows
    whose logprobs are wanted (SamplingParams.prompt_logprobs), then (async scheduling) the input_ids entries
    whose token the previous step sampled on the device and their indexes among its samples, num_gathered each;
    ints (int32): query_start_loc, seq_lens, then the block tables, num_seqs rows of width."""
    longs: torch.Tensor
    ints: torch.Tensor
    num_seqs: int
    num_tokens: int
    width: int
    max_query_len: int
    max_seq_len: int
    num_gathered: int = 0


class ModelInput(NamedTuple):
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor


def _field_offsets(num_tokens: int, num_seqs: int) -> tuple[int, int, int]:
    """Each field padded to 16 bytes: the int64 fields of num_tokens; query_start_loc and seq_lens (int32)."""
    return -(-num_tokens // 2) * 2, -(-(num_seqs + 1) // 4) * 4, -(-num_seqs // 4) * 4


class ModelRunner:
    supports_async_scheduling = True

    def __init__(self, config: EngineConfig) -> None:
        model_config = config.model
        if model_config.tensor_parallel_size != get_tensor_parallel_world_size():
            raise ValueError(f"tensor_parallel_size={model_config.tensor_parallel_size} needs one ModelRunner per rank "
                             "of a process group that size: build the engine with LLM(...), which starts them")
        torch.manual_seed(model_config.seed)
        self.config = config
        self.block_size = config.cache.block_size
        self.device = resolve_device(model_config.device)
        self.hf_config = load_hf_config(model_config.model)
        self.dtype = resolve_dtype(model_config.dtype, self.hf_config, self.device)
        self.model = load_model(model_config.model, self.hf_config, self.dtype, self.device, model_config.quantization)
        self.model_max_len = model_max_length(self.hf_config)
        self.eos_token_ids = eos_token_ids(model_config.model, self.hf_config)
        self.sampler = Sampler(self.eos_token_ids)
        self.input_batch = InputBatch(max_blocks=16 * -(-config.scheduler.max_model_len // (16 * self.block_size)))
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        fp8 = config.cache.kv_cache_dtype.startswith("fp8")
        self.kv_cache_dtype = torch.float8_e4m3fn if fp8 else self.dtype
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        self.cpu_k_caches: list[torch.Tensor] = []
        self.cpu_v_caches: list[torch.Tensor] = []
        self.use_cuda_graphs = self.device.type == "cuda" and not model_config.enforce_eager
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_batch_sizes: list[int] = []
        self.graph_buffers: dict[str, torch.Tensor] = {}
        self.graph_output: torch.Tensor | None = None
        # async scheduling: the last launched step's sampled ids (on the device) and each sequence's first index
        # among them, for the next step's rows whose previous token is not on the host yet
        self._prev_sampled: tuple[torch.Tensor, dict[int, int]] | None = None
        self._prev_output: AsyncOutput | None = None
        if fp8:     # per-layer K/V scales as device tensors: the kernels load them, CUDA graphs included
            calibrate_kv_scales(self.attention_layers, self._forward_uncached, self.hf_config.vocab_size,
                                getattr(self.hf_config, "bos_token_id", None),
                                min(config.scheduler.max_model_len, self.model_max_len), self.device)

    # --- KV cache sizing and allocation ------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        """K and V of block_size tokens in every layer."""
        layer = self.attention_layers[0]
        return (2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * layer.head_dim
                * self.kv_cache_dtype.itemsize)

    @property
    def weight_bytes(self) -> int:
        """This process's share of the weights (parameters and buffers such as rotary tables)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def profile_num_blocks(self) -> dict:
        """How many KV blocks fit, with every term of the computation (bytes), for the engine to log."""
        cache = self.config.cache
        layer = self.attention_layers[0]
        report = {"device": str(self.device), "bytes_per_block": self.bytes_per_block,
                  "weight_bytes": self.weight_bytes, "num_heads": layer.num_heads, "num_kv_heads": layer.num_kv_heads}
        if self.device.type == "cuda":
            report.update(self._profile_gpu_memory())
        else:
            report["kv_cache"] = int(cache.cpu_kv_cache_space * GiB)
        report["num_gpu_blocks"] = cache.num_gpu_blocks_override or max(report["kv_cache"] // self.bytes_per_block, 0)
        report["num_gpu_blocks_override"] = cache.num_gpu_blocks_override
        report["num_cpu_blocks"] = int(cache.swap_space * GiB) // self.bytes_per_block
        return report

    def _profile_gpu_memory(self) -> dict:
        """KV budget = total × gpu_memory_utilization − weights − peak activations − memory outside torch."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
        self._profile_forward()
        torch.cuda.synchronize()
        peak_activation = torch.cuda.max_memory_allocated() - weights
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()     # CUDA context, cuBLAS workspaces, others
        torch.cuda.empty_cache()
        utilization = self.config.cache.gpu_memory_utilization
        return {"total": total, "gpu_memory_utilization": utilization, "weights": weights,
                "peak_activation": peak_activation, "non_torch": non_torch,
                "kv_cache": int(total * utilization - weights - peak_activation - non_torch)}

    @torch.inference_mode()
    def _profile_forward(self) -> None:
        """The largest step: max_num_batched_tokens in sequences of at most max_model_len, no cache bound, then
        the sampler's worst case (fp32 logits of max_num_seqs rows, their softmax and a sort)."""
        sched = self.config.scheduler
        num_tokens, max_len = sched.max_num_batched_tokens, min(sched.max_model_len, self.model_max_len)
        seq_lens = [max_len] * (num_tokens // max_len) + ([num_tokens % max_len] if num_tokens % max_len else [])
        hidden = self._forward_uncached(torch.zeros(num_tokens, dtype=torch.int64, device=self.device), seq_lens)
        logits = self.model.compute_logits(hidden[:logit_rows_per_pass(sched)])
        if logits is not None:      # None on tensor-parallel ranks > 0: only rank 0 samples
            logits.float().softmax(dim=-1).sort(dim=-1)

    def _forward_uncached(self, input_ids: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Packed sequences, each its own whole context, through plain causal attention (no cache bound)."""
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(self.device)
        query_start_loc = torch.tensor([0] + seq_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.full((len(input_ids),), -1, device=self.device),
            query_start_loc=query_start_loc.to(self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(len(seq_lens), 0, dtype=torch.int32, device=self.device),
            max_query_len=max(seq_lens), max_seq_len=max(seq_lens), is_decode=False)
        return self.forward(input_ids, positions, meta)

    def allocate_kv_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        """Allocate the device cache and the CPU swap cache, bind each layer's K/V views, capture the decode graphs.
        The swap cache is left uninitialized: a CPU block is only read back after a swap-out wrote it."""
        layer = self.attention_layers[0]
        block_shape = (self.block_size, layer.num_kv_heads, layer.head_dim)
        num_layers = len(self.attention_layers)
        gpu = torch.zeros(2, num_layers, num_gpu_blocks, *block_shape, dtype=self.kv_cache_dtype, device=self.device)
        cpu = torch.empty(2, num_layers, num_cpu_blocks, *block_shape, dtype=self.kv_cache_dtype,
                          pin_memory=self.device.type == "cuda")
        self.k_caches, self.v_caches = list(gpu[0]), list(gpu[1])
        self.cpu_k_caches, self.cpu_v_caches = list(cpu[0]), list(cpu[1])
        for layer, k_cache, v_cache in zip(self.attention_layers, self.k_caches, self.v_caches):
            layer.k_cache, layer.v_cache = k_cache, v_cache
        if self.use_cuda_graphs:
            self._capture_decode_graphs()
        warm_up(self)   # every other Triton variant the configuration can meet, before serving (executor/warmup.py)

    # --- one step ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput,
                grammar: Callable[[int], GrammarBitmask | None] | None = None) -> list[SampleResult | None]:
        """One result per scheduled sequence, aligned with out.seq_ids. grammar(vocab_size), when given, returns
        the structured-output bitmask of the sampling rows; it is called once the forward pass is launched, so the
        host fills it while the device computes."""
        start = time.perf_counter()
        step = self.execute_model(out)
        launched = time.perf_counter()
        results = self.sample(step, out, grammar)
        # host seconds of (prepare, forward, sample): the engine's StepStats carry them
        self.last_phase_times = (self._prepared - start, launched - self._prepared, time.perf_counter() - launched)
        self._prev_sampled = self._prev_output = None
        return results

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput,
               grammar: Callable[[int], GrammarBitmask | None] | None = None) -> AsyncOutput:
        """Async scheduling: execute's forward pass and sampling, without waiting for the tokens. Rows whose input
        token the previous launch sampled read it off the device. AsyncOutput.results() brings the tokens."""
        start = time.perf_counter()
        step = self.execute_model(out)
        launched = time.perf_counter()
        sampled = self._draw(step, out, grammar)
        self._prev_sampled = None
        if sampled is not None:
            first, index = 0, {}
            for seq_id, k in zip(out.seq_ids, out.num_samples):
                if k:
                    index[seq_id] = first
                    first += k
            self._prev_sampled = (sampled.tokens, index)
        output = self._prev_output = AsyncOutput(step, sampled, out.num_samples, self.device)
        self.last_phase_times = (self._prepared - start, launched - self._prepared, time.perf_counter() - launched)
        return output

    def collect(self, output: AsyncOutput) -> list[SampleResult | None]:
        """A launched step's results, once its tokens are on the host."""
        return output.results()

    def _draw(self, step: StepLogits | None, out: SchedulerOutput,
              grammar: Callable[[int], GrammarBitmask | None] | None) -> SampledTokens | None:
        if step is None or step.logits is None or not any(out.num_samples):
            return None
        rows, sampling = self.input_batch.rows(out.seq_ids), [i for i, k in enumerate(out.num_samples) if k]
        if grammar is None and self.input_batch.plain_greedy[rows[sampling]].all():
            return SampledTokens(step.logits.argmax(dim=-1), [1] * len(sampling))
        mask = grammar(step.logits.shape[1]) if grammar is not None else None
        return self.sampler.draw(step.logits, self._sampling_rows(out, rows, sampling), mask)

    def _sampling_rows(self, out: SchedulerOutput, rows: np.ndarray, sampling: list[int]) -> list[SamplingRow]:
        batch, sampling_rows = self.input_batch, []
        for i in sampling:
            row = int(rows[i])
            tokens = batch.token_ids[row, :batch.num_tokens[row]]
            if out.num_computed_tokens[i] + out.num_scheduled_tokens[i] > len(tokens):
                # async scheduling: its last token is the previous launch's sample, which the sampling parameters
                # may read (penalties, min_tokens, bad_words): wait for that launch's tokens, not for this one
                tokens = np.append(tokens, self._prev_output.sampled_token(self._prev_sampled[1][out.seq_ids[i]]))
            sampling_rows.append(SamplingRow(batch.req_ids[row], batch.seq_indexes[row], batch.params[row], tokens,
                                             int(batch.num_prompt_tokens[row]), out.num_samples[i]))
        return sampling_rows

    def execute_model(self, out: SchedulerOutput) -> StepLogits | None:
        """The persistent batch updated from the output's diffs, the step's block moves, then the forward pass
        and the LM head over the sampling rows (and the prompt rows, reduced to their logprobs in bounded passes).
        Every tensor-parallel rank runs this on the same output. The logits (None on ranks > 0, or when no sequence
        samples) are the sampler's input."""
        self.input_batch.update(out)
        self.sampler.forget(out.finished_req_ids)
        self._move_blocks(out)
        if not out.seq_ids:
            self._prepared = time.perf_counter()
            return None
        spans = self._prompt_logprob_spans(out, self.input_batch.rows(out.seq_ids))
        batch = self.prepare(out, spans)
        self._prepared = time.perf_counter()
        model_input = self.upload(batch)
        hidden = self.forward(model_input.input_ids, model_input.positions, model_input.meta)
        sample_rows = model_input.sample_rows
        if not len(sample_rows):
            return None
        num_sampling = len(sample_rows) - sum(span.count for span in spans)
        return lm_head(self.model.compute_logits, hidden[sample_rows], num_sampling, spans,
                       logit_rows_per_pass(self.config.scheduler))

    def sample(self, step: StepLogits | None, out: SchedulerOutput,
               grammar: Callable[[int], GrammarBitmask | None] | None = None) -> list[SampleResult | None]:
        """One result per scheduled sequence: a SampleResult where it samples or has prompt logprobs, None where its
        step ends mid-prompt."""
        if step is None or step.logits is None:
            return [None] * len(out.seq_ids)
        sampled = self._draw(step, out, grammar)
        results = iter(sampled.results() if sampled is not None else ())
        results = [next(results) if k else None for k in out.num_samples]
        return attach_prompt_logprobs(step, results)

    def _prompt_logprob_spans(self, out: SchedulerOutput, rows: np.ndarray) -> list[PromptLogprobSpan]:
        """The prompt positions of this step's rows whose next-token logprobs are wanted (SamplingParams.
        prompt_logprobs; the first sequence of a request only)."""
        batch, spans = self.input_batch, []
        if not batch.prompt_logprob_seqs:
            return spans
        for i, seq_id in enumerate(out.seq_ids):
            if seq_id in batch.prompt_logprob_seqs:
                row = int(rows[i])
                first, end = prompt_logprob_range(out.num_computed_tokens[i], out.num_scheduled_tokens[i],
                                                  int(batch.num_prompt_tokens[row]), batch.prompt_logprobs_start[row])
                if end > first:
                    spans.append(PromptLogprobSpan(i, first, batch.token_ids[row, first + 1:end + 1].tolist(),
                                                   batch.params[row].prompt_logprobs))
        return spans

    def _move_blocks(self, out: SchedulerOutput) -> None:
        """Swap-out, swap-in, then copy-on-write copies: the order the scheduler decided them in."""
        gpu_caches, cpu_caches = self.k_caches + self.v_caches, self.cpu_k_caches + self.cpu_v_caches
        for pairs, src_caches, dst_caches in ((out.blocks_to_swap_out, gpu_caches, cpu_caches),
                                              (out.blocks_to_swap_in, cpu_caches, gpu_caches)):
            if pairs:
                mapping = torch.tensor(pairs, dtype=torch.int64)    # on the CPU: the copies are issued from the host
                for src_cache, dst_cache in zip(src_caches, dst_caches):
                    swap_blocks(src_cache, dst_cache, mapping)
        if out.blocks_to_copy:
            mapping = torch.tensor(out.blocks_to_copy, dtype=torch.int64, device=self.device)
            copy_blocks(self.k_caches, self.v_caches, mapping)

    def prepare(self, out: SchedulerOutput, prompt_spans: list[PromptLogprobSpan] | None = None) -> HostBatch:
        """Flat input_ids/positions over all new tokens, their cache slots, and each sequence's layout, packed on
        the host from the persistent batch.

        Built with numpy into two host buffers (int64, int32) that upload() copies to the device in one transfer
        each: per-token Python loops and one small copy per field cost milliseconds a step at batch 256, with the
        GPU idle. Every field starts 16 bytes into alignment, as a tensor of its own would: Triton specializes
        kernels on pointer alignment, so a field whose alignment changed with the batch would compile new variants
        mid-run. For the same reason the block-table width (a stride the attention kernels take) is a multiple
        of 16."""
        batch, block_size, n = self.input_batch, self.block_size, len(out.seq_ids)
        rows = batch.rows(out.seq_ids)
        starts = np.asarray(out.num_computed_tokens, np.int64)
        query_lens = np.asarray(out.num_scheduled_tokens, np.int64)
        num_tokens, width = int(query_lens.sum()), -(-int(batch.num_blocks[rows].max()) // 16) * 16
        query_start_loc = np.zeros(n + 1, np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        sampling = [i for i, k in enumerate(out.num_samples) if k]
        if prompt_spans is None:
            prompt_spans = self._prompt_logprob_spans(out, rows)
        gather_dst, gather_src = self._gathered_inputs(out, rows, starts, query_start_loc)

        t, (t16, n16, m16) = num_tokens, _field_offsets(num_tokens, n)
        pin = self.device.type == "cuda"
        num_prompt_rows, k = sum(span.count for span in prompt_spans), len(gather_dst)
        longs = torch.empty(3 * t16 + len(sampling) + num_prompt_rows + 2 * k, dtype=torch.int64, pin_memory=pin)
        ints = torch.empty(n16 + m16 + n * width, dtype=torch.int32, pin_memory=pin)
        host_longs, host_ints = longs.numpy(), ints.numpy()
        input_ids, positions = host_longs[:t], host_longs[t16:t16 + t]
        slots, sample_rows = host_longs[2 * t16:2 * t16 + t], host_longs[3 * t16:len(host_longs) - 2 * k]
        qsl, seq_lens = host_ints[:n + 1], host_ints[n16:n16 + n]
        block_tables = host_ints[n16 + m16:].reshape(n, width)
        if num_tokens == n:     # decode: one token per sequence
            seq_index = np.arange(n)
            positions[:] = starts
        else:
            seq_index = np.repeat(np.arange(n), query_lens)
            positions[:] = np.arange(num_tokens) - np.repeat(query_start_loc[:-1] - starts, query_lens)
        input_ids[:] = batch.token_ids[rows[seq_index], positions]
        stored = min(width, batch.block_table.shape[1])     # entries past a row's blocks are 0
        block_tables[:, :stored] = batch.block_table[rows, :stored]
        block_tables[:, stored:] = 0
        blocks = block_tables[seq_index, positions // block_size].astype(np.int64)
        slots[:] = blocks * block_size + positions % block_size
        qsl[:] = query_start_loc
        seq_lens[:] = starts + query_lens
        sample_rows[:len(sampling)] = query_start_loc[1:][sampling] - 1
        if prompt_spans:     # row of position p = the sequence's first row + (p - start)
            sample_rows[len(sampling):] = np.concatenate([
                np.arange(span.count) + query_start_loc[span.row] + span.first - starts[span.row]
                for span in prompt_spans])
        if k:
            host_longs[len(host_longs) - 2 * k:] = np.concatenate([gather_dst, gather_src])
        return HostBatch(longs, ints, n, num_tokens, width, int(query_lens.max()), int(seq_lens.max()), k)

    def _gathered_inputs(self, out: SchedulerOutput, rows: np.ndarray, starts: np.ndarray,
                         query_start_loc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Async scheduling: the rows whose input token (the one at their first position) the host does not have
        yet, because the previous launch sampled it: their entries of input_ids, and the indexes of those tokens
        among that launch's samples."""
        batch = self.input_batch
        missing = np.flatnonzero(starts >= batch.num_tokens[rows]) if self._prev_sampled is not None else ()
        if not len(missing):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        index = self._prev_sampled[1]
        try:
            src = np.fromiter((index[out.seq_ids[i]] for i in missing), np.int64, len(missing))
        except KeyError as exc:
            raise RuntimeError(f"sequence {exc.args[0]} is scheduled after a token the previous step did not "
                               "sample: the scheduler's placeholders and the worker disagree") from None
        batch.reserve_tokens(int(starts[missing].max()) + 1)     # the rows read a (placeholder) entry past their end
        return query_start_loc[missing], src

    def upload(self, batch: HostBatch) -> ModelInput:
        """The batch on the device: two copies, then views of them as the model's inputs."""
        t, n, width = batch.num_tokens, batch.num_seqs, batch.width
        t16, n16, m16 = _field_offsets(t, n)
        longs = batch.longs.to(self.device, non_blocking=True)
        ints = batch.ints.to(self.device, non_blocking=True)
        meta = AttentionMetadata(
            slot_mapping=longs[2 * t16:2 * t16 + t], query_start_loc=ints[:n + 1], seq_lens=ints[n16:n16 + n],
            block_tables=ints[n16 + m16:].view(n, width), max_query_len=batch.max_query_len,
            max_seq_len=batch.max_seq_len, is_decode=t == n)
        k, input_ids = batch.num_gathered, longs[:t]
        end = len(longs) - 2 * k
        if k:       # the previous step's samples, still on the device, become these rows' input ids
            input_ids.index_copy_(0, longs[end:end + k], self._prev_sampled[0].index_select(0, longs[end + k:]))
        return ModelInput(input_ids, longs[t16:t16 + t], meta, longs[3 * t16:end])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states of the packed batch: a decode graph's replay where one holds it, else an eager pass."""
        if (self.graphs and meta.is_decode and len(input_ids) <= self.graph_batch_sizes[-1]
                and meta.block_tables.shape[1] <= self.graph_buffers["block_tables"].shape[1]):
            return self._replay_decode_graph(input_ids, positions, meta)
        set_attention_metadata(meta)
        try:
            return self.model(input_ids, positions)
        finally:
            set_attention_metadata(None)

    # --- CUDA graphs for decode batches ------------------------------------------------------------------------
    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        """One graph per bucket batch size over static input buffers; a batch replays the smallest bucket that
        holds it. Padding rows write nowhere (slot -1) and attend to one cached token, so they stay finite."""
        max_batch = min(self.config.scheduler.max_num_seqs, MAX_GRAPH_BATCH)
        self.graph_batch_sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
        self.graph_batch_sizes.append(max_batch)
        max_blocks = -(-self.config.scheduler.max_model_len // (16 * self.block_size)) * 16   # as prepare() pads
        self.graph_buffers = buffers = {
            "input_ids": torch.zeros(max_batch, dtype=torch.int64, device=self.device),
            "positions": torch.zeros(max_batch, dtype=torch.int64, device=self.device),
            "slot_mapping": torch.full((max_batch,), -1, dtype=torch.int64, device=self.device),
            "seq_lens": torch.ones(max_batch, dtype=torch.int32, device=self.device),
            "block_tables": torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=self.device),
            "query_start_loc": torch.arange(max_batch + 1, dtype=torch.int32, device=self.device),
        }
        pool = None
        for batch in reversed(self.graph_batch_sizes):    # largest first: smaller graphs reuse its memory pool
            meta = AttentionMetadata(
                slot_mapping=buffers["slot_mapping"][:batch], query_start_loc=buffers["query_start_loc"][:batch + 1],
                seq_lens=buffers["seq_lens"][:batch], block_tables=buffers["block_tables"][:batch],
                max_query_len=1, max_seq_len=max_blocks * self.block_size, is_decode=True)
            set_attention_metadata(meta)
            try:
                # warm-up outside the graph: compiles the kernels and sizes the output buffer
                hidden = self.model(buffers["input_ids"][:batch], buffers["positions"][:batch])
                if self.graph_output is None:
                    self.graph_output = torch.empty(max_batch, hidden.shape[1], dtype=hidden.dtype, device=self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self.graph_output[:batch] = self.model(buffers["input_ids"][:batch], buffers["positions"][:batch])
            finally:
                set_attention_metadata(None)
            pool = graph.pool()
            self.graphs[batch] = graph
            torch.cuda.synchronize()

    def release_cuda_graphs(self) -> None:
        """Destroy the decode graphs. Under tensor parallelism this must come before the process group goes: NCCL
        waits for every graph holding one of its collectives to be destroyed before it destroys the communicator."""
        self.graphs.clear()
        self.graph_batch_sizes = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _replay_decode_graph(self, input_ids: torch.Tensor, positions: torch.Tensor,
                             meta: AttentionMetadata) -> torch.Tensor:
        n = len(input_ids)
        batch = next(b for b in self.graph_batch_sizes if b >= n)
        buffers = self.graph_buffers
        buffers["input_ids"][:n] = input_ids
        buffers["positions"][:n] = positions
        buffers["slot_mapping"][:n] = meta.slot_mapping
        buffers["slot_mapping"][n:batch] = -1
        buffers["seq_lens"][:n] = meta.seq_lens
        buffers["seq_lens"][n:batch] = 1
        buffers["block_tables"][:n, :meta.block_tables.shape[1]] = meta.block_tables
        self.graphs[batch].replay()
        return self.graph_output[:n]
