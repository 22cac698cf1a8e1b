"""ModelRunner and Sampler against transformers, on tiny random checkpoints of every supported architecture.

A minimal driver plays the scheduler's side of the executor contract by hand, in plain data only (block tables
from a shuffled free list, so no sequence's blocks are contiguous; new sequences sent whole, then token and block
diffs; forks with copy-on-write; swaps) and records the logits of every sampled row, which are compared with a
transformers forward pass in float32.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from pagedlab import kernels
from pagedlab.config import EngineConfig
from pagedlab.executor.model_runner import ModelRunner
from pagedlab.layers.attention import AttentionMetadata
from pagedlab.layers.sampler import Sampler, SamplingRow, apply_min_p, apply_penalties, apply_top_k_top_p
from pagedlab.sampling_params import SamplingParams
from pagedlab.sched_output import NewSeqData, SchedulerOutput
from pagedlab.sequence import Request
from tests.model_fixtures import ARCHITECTURES, build_tiny_checkpoint, load_hf_model, tiny_model  # noqa: F401

ATOL = 1e-4
GREEDY_20 = SamplingParams(temperature=0, max_tokens=20, min_tokens=20)   # min_tokens: HF's min_new_tokens


@pytest.fixture(autouse=True, scope="module")
def reference_kernels_one_thread():
    """Kernels through their torch references (one test below runs the Triton interpreter), and one torch
    thread: the models are tiny, and on a shared 2-core machine more threads only contend."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()


def make_runner(model_dir: str, block_size: int = 16, num_blocks: int = 128, num_cpu_blocks: int = 32,
                **kwargs) -> ModelRunner:
    config = EngineConfig.from_kwargs(model=model_dir, device="cpu", dtype="float32", block_size=block_size,
                                      max_model_len=256, **kwargs)
    runner = ModelRunner(config)
    runner.allocate_kv_cache(num_blocks, num_cpu_blocks)
    return runner


class Driver:
    """The scheduler's half of the executor contract, by hand and in plain data."""

    def __init__(self, runner: ModelRunner, seed: int = 0) -> None:
        self.runner, self.block_size, self.step_id = runner, runner.block_size, 0
        self.free = list(range(runner.k_caches[0].shape[0]))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.sent: dict[int, tuple[int, int]] = {}      # seq_id -> (tokens, blocks) the runner holds
        self.preempted: list[int] = []
        self.pending_copies: list[tuple[int, int]] = []
        self.logits: dict[int, list[torch.Tensor]] = defaultdict(list)    # seq_id -> each sampled row's logits
        sample = runner.sample

        def recording_sample(step, out, grammar=None):
            if step is not None and step.logits is not None:
                sampling = [seq_id for seq_id, k in zip(out.seq_ids, out.num_samples) if k]
                for seq_id, row_logits in zip(sampling, step.logits):
                    self.logits[seq_id].append(row_logits.float().clone())
            return sample(step, out, grammar)
        runner.sample = recording_sample

    def schedule(self, request: Request, num_new_tokens: int | None = None, seq_index: int = 0):
        seq = request.seqs[seq_index]
        num_new_tokens = num_new_tokens or seq.num_tokens - seq.num_computed_tokens
        table = self.tables.setdefault(seq.seq_id, [])
        while len(table) * self.block_size < seq.num_computed_tokens + num_new_tokens:
            table.append(self.free.pop())
        return request, seq_index, num_new_tokens

    def preempt(self, request: Request) -> None:
        """The runner forgets the request's sequences (their blocks move); they come back as new."""
        for seq in request.seqs:
            del self.sent[seq.seq_id]
            self.preempted.append(seq.seq_id)

    def output(self, scheduled, **block_moves) -> SchedulerOutput:
        out = SchedulerOutput(self.step_id, blocks_to_copy=self.pending_copies, preempted_seq_ids=self.preempted,
                              **block_moves)
        self.step_id, self.pending_copies, self.preempted = self.step_id + 1, [], []
        for request, seq_index, num_new in scheduled:
            seq, table = request.seqs[seq_index], self.tables[request.seqs[seq_index].seq_id]
            ends = seq.num_computed_tokens + num_new == seq.num_tokens
            out.seq_ids.append(seq.seq_id)
            out.num_scheduled_tokens.append(num_new)
            out.num_computed_tokens.append(seq.num_computed_tokens)
            out.num_samples.append(0 if not ends else request.sampling_params.n if len(request.seqs) == 1 else 1)
            if seq.seq_id in self.sent:
                num_tokens, num_blocks = self.sent[seq.seq_id]
                out.cached_seqs.seq_ids.append(seq.seq_id)
                out.cached_seqs.new_token_ids.append(seq.token_ids[num_tokens:])
                out.cached_seqs.new_block_ids.append(table[num_blocks:])
            else:
                out.new_seqs.append(NewSeqData(seq.seq_id, request.request_id, seq_index, list(seq.token_ids),
                                               seq.num_prompt_tokens, list(table), request.sampling_params))
            self.sent[seq.seq_id] = (seq.num_tokens, len(table))
        return out

    def step(self, scheduled, **block_moves):
        out = self.output(scheduled, **block_moves)
        results = self.runner.execute(out)
        for (request, seq_index, num_new), result in zip(scheduled, results):
            seq = request.seqs[seq_index]
            seq.num_computed_tokens += num_new
            if result is None:
                continue
            seqs = [seq] + [self._fork(request, seq) for _ in result.token_ids[1:]]
            for seq, token in zip(seqs, result.token_ids):
                seq.token_ids.append(token)
        return results

    def _fork(self, request: Request, parent):
        """The child shares the parent's full blocks; a partial last block is copied (copy-on-write)."""
        child = parent.fork()
        request.seqs.append(child)
        table = self.tables[parent.seq_id]
        if parent.num_computed_tokens % self.block_size:
            block = self.free.pop()
            self.pending_copies.append((table[-1], block))
            table = table[:-1] + [block]
        self.tables[child.seq_id] = list(table)
        return child

    def decode(self, requests: list[Request], num_steps: int) -> None:
        for _ in range(num_steps):
            self.step([self.schedule(r, seq_index=i) for r in requests for i in range(len(r.seqs))])


def random_prompt(length: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(3, 256), k=length)


_hf_models: dict[str, torch.nn.Module] = {}
_hf_greedy: dict[tuple, list[int]] = {}


def hf_model(model_dir: str) -> torch.nn.Module:
    if model_dir not in _hf_models:
        _hf_models[model_dir] = load_hf_model(model_dir)
    return _hf_models[model_dir]


def hf_greedy(model_dir: str, prompt: list[int], num_tokens: int) -> list[int]:
    key = (model_dir, tuple(prompt), num_tokens)
    if key not in _hf_greedy:
        out = hf_model(model_dir).generate(torch.tensor([prompt]), max_new_tokens=num_tokens,
                                           min_new_tokens=num_tokens, do_sample=False)
        _hf_greedy[key] = out[0, len(prompt):].tolist()
    return _hf_greedy[key]


def assert_logits_match_hf(model_dir: str, driver: Driver, seq, atol: float = ATOL) -> None:
    """Each logits row the runner sampled `seq` from equals transformers' at that position."""
    with torch.no_grad():
        ref = hf_model(model_dir)(torch.tensor([seq.token_ids[:-1]])).logits[0, seq.num_prompt_tokens - 1:]
    ours = torch.stack(driver.logits[seq.seq_id])
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < atol


def assert_matches_hf(model_dir: str, driver: Driver, request: Request) -> None:
    seq = request.seqs[0]
    assert seq.output_token_ids == hf_greedy(model_dir, request.prompt_token_ids, seq.num_output_tokens)
    assert_logits_match_hf(model_dir, driver, seq)


# --- the runner against transformers -----------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(tiny_model, arch, block_size):  # noqa: F811
    """A batch of prompts of different lengths prefilled together, then decoded together for 20 tokens."""
    model_dir = tiny_model(arch)
    driver = Driver(make_runner(model_dir, block_size))
    requests = [Request(f"r{i}", random_prompt(n, seed=i), GREEDY_20) for i, n in enumerate((7, 13, 1))]
    driver.step([driver.schedule(r) for r in requests])
    driver.decode(requests, 19)
    for request in requests:
        assert request.seqs[0].num_output_tokens == 20
        assert_matches_hf(model_dir, driver, request)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_mixed_with_decodes(tiny_model, arch):  # noqa: F811
    """B's prompt is split over three steps, each batched with A's decodes; block boundaries fall mid-chunk."""
    model_dir = tiny_model(arch)
    driver = Driver(make_runner(model_dir, block_size=5))
    a = Request("a", random_prompt(9, seed=10), GREEDY_20)
    b = Request("b", random_prompt(23, seed=11), GREEDY_20)
    driver.step([driver.schedule(a)])
    for chunk in (10, 8, 5):
        results = driver.step([driver.schedule(a), driver.schedule(b, chunk)])
        assert (results[1] is None) == (chunk != 5)
    driver.decode([a, b], 6)
    for request in (a, b):
        assert_matches_hf(model_dir, driver, request)


def test_fork_copy_on_write_and_swap(tiny_model):  # noqa: F811
    """n=2 forks from a partial last block (copied for the child); later every block is swapped out to the CPU
    and back in to fresh blocks. Both samples must continue exactly as transformers would."""
    model_dir = tiny_model("llama")
    driver = Driver(make_runner(model_dir, block_size=4))
    request = Request("r", random_prompt(10, seed=3), SamplingParams(n=2, temperature=0, max_tokens=12))
    driver.step([driver.schedule(request)])
    assert len(request.seqs) == 2 and driver.pending_copies
    driver.decode([request], 3)

    gpu_blocks = sorted({b for seq in request.seqs for b in driver.tables[seq.seq_id]})
    to_cpu = {block: i for i, block in enumerate(gpu_blocks)}
    driver.preempt(request)
    assert driver.runner.execute(driver.output([], blocks_to_swap_out=list(to_cpu.items()))) == []
    assert not driver.runner.input_batch.row_of
    to_gpu = {block: driver.free.pop() for block in gpu_blocks}
    for seq in request.seqs:
        driver.tables[seq.seq_id] = [to_gpu[b] for b in driver.tables[seq.seq_id]]
    swap_in = [(to_cpu[block], to_gpu[block]) for block in gpu_blocks]
    driver.step([driver.schedule(request, seq_index=i) for i in range(2)], blocks_to_swap_in=swap_in)
    driver.decode([request], 4)

    expected = hf_greedy(model_dir, request.prompt_token_ids, 9)
    for seq in request.seqs:
        assert seq.output_token_ids == expected
    assert_logits_match_hf(model_dir, driver, request.seqs[0])


def test_seeded_sampling_independent_of_batch(tiny_model):  # noqa: F811
    """A seeded request draws the same tokens alone, batched with others, and in a fresh runner."""
    model_dir = tiny_model("qwen2")
    seeded = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12)

    def run(others: int) -> list[int]:
        driver = Driver(make_runner(model_dir))
        target = Request("target", random_prompt(6, seed=0), SamplingParams(**seeded))
        batch = [Request(f"o{i}", random_prompt(4 + i, seed=i + 1), SamplingParams(temperature=1.0, seed=i or None))
                 for i in range(others)]
        batch.insert(others // 2, target)
        driver.step([driver.schedule(r) for r in batch])
        driver.decode(batch, 11)
        return target.seqs[0].output_token_ids

    alone = run(0)
    assert run(3) == alone and run(0) == alone


def test_profiling_pass_without_cache_matches_transformers(tiny_model):  # noqa: F811
    """With no cache bound, attention is plain causal attention over each packed sequence."""
    model_dir = tiny_model("llama3")
    config = EngineConfig.from_kwargs(model=model_dir, device="cpu", max_model_len=64, max_num_batched_tokens=100)
    runner = ModelRunner(config)
    prompts = [random_prompt(n, seed=n) for n in (11, 6)]
    positions = torch.tensor([p for prompt in prompts for p in range(len(prompt))])
    meta = AttentionMetadata(slot_mapping=torch.full((17,), -1), query_start_loc=torch.tensor([0, 11, 17]),
                             seq_lens=torch.tensor([11, 6]), block_tables=torch.zeros(2, 0, dtype=torch.int32),
                             max_query_len=11, max_seq_len=11, is_decode=False)
    with torch.no_grad():
        logits = runner.model.compute_logits(runner.forward(torch.tensor(sum(prompts, [])), positions, meta))
        for prompt, ours in zip(prompts, logits.split([11, 6])):
            assert (ours - hf_model(model_dir)(torch.tensor([prompt])).logits[0]).abs().max() < ATOL
    runner._profile_forward()     # 100 tokens in sequences of at most 64: runs without a cache


def test_block_budget(tiny_model):  # noqa: F811
    model_dir = tiny_model("llama")
    runner = ModelRunner(EngineConfig.from_kwargs(model=model_dir, device="cpu", block_size=16,
                                                  cpu_kv_cache_space=0.001, swap_space=0.002))
    assert runner.bytes_per_block == 2 * 2 * 16 * 2 * 16 * 4      # K and V x layers x tokens x Hkv x D x fp32
    report = runner.profile_num_blocks()
    assert report["num_gpu_blocks"] == int(0.001 * 2**30) // runner.bytes_per_block
    assert report["num_cpu_blocks"] == int(0.002 * 2**30) // runner.bytes_per_block
    fp8 = ModelRunner(EngineConfig.from_kwargs(model=model_dir, device="cpu", kv_cache_dtype="fp8",
                                               num_gpu_blocks_override=7))
    assert fp8.bytes_per_block == runner.bytes_per_block // 4
    assert fp8.profile_num_blocks()["num_gpu_blocks"] == 7


def test_fp8_kv_cache_stays_close(tiny_model):  # noqa: F811
    model_dir = tiny_model("mistral")
    driver = Driver(make_runner(model_dir, block_size=16, kv_cache_dtype="fp8"))
    request = Request("r", random_prompt(12, seed=5), SamplingParams(temperature=0, max_tokens=8))
    driver.step([driver.schedule(request)])
    driver.decode([request], 7)
    assert driver.runner.k_caches[0].dtype == torch.float8_e4m3fn
    assert_logits_match_hf(model_dir, driver, request.seqs[0], atol=0.25)     # e4m3 keeps 3 mantissa bits


def test_bin_checkpoint_and_unsupported_architecture(tmp_path):
    model_dir = build_tiny_checkpoint("gpt2", str(tmp_path / "gpt2"), safetensors=False)
    driver = Driver(make_runner(model_dir, block_size=5))
    request = Request("r", random_prompt(8, seed=2), SamplingParams(temperature=0, max_tokens=5, min_tokens=5))
    driver.step([driver.schedule(request)])
    driver.decode([request], 4)
    assert_matches_hf(model_dir, driver, request)

    other = build_tiny_checkpoint("llama", str(tmp_path / "other"))
    config_path = tmp_path / "other" / "config.json"
    config_path.write_text(config_path.read_text().replace("LlamaForCausalLM", "FooForCausalLM"))
    with pytest.raises(ValueError, match="not supported; supported: LlamaForCausalLM, MistralForCausalLM"):
        ModelRunner(EngineConfig.from_kwargs(model=other, device="cpu"))


def test_triton_kernels_in_interpreter(tiny_model, monkeypatch):  # noqa: F811
    """The runner's calls into the Triton kernels (dtypes, strides, metadata), run by Triton's interpreter —
    in a fresh python, since the interpreter must be chosen before triton is first imported."""
    pytest.importorskip("triton")
    if os.environ.get("PAGEDLAB_RUNNER_INTERPRETED") != "1":
        env = {**os.environ, "TRITON_INTERPRET": "1", "PAGEDLAB_RUNNER_INTERPRETED": "1"}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 f"{__file__}::test_triton_kernels_in_interpreter"],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_triton(torch.empty(1))
    for name in ("write_kv_cache_ref", "paged_decode_attention_ref", "paged_prefill_attention_ref"):
        monkeypatch.setattr(kernels, name, None)     # a fallback to a reference would fail loudly
    model_dir = tiny_model("llama")
    driver = Driver(make_runner(model_dir, block_size=16))
    a = Request("a", random_prompt(5, seed=7), SamplingParams(temperature=0, max_tokens=4, min_tokens=4))
    b = Request("b", random_prompt(20, seed=8), SamplingParams(temperature=0, max_tokens=4, min_tokens=4))
    driver.step([driver.schedule(a)])
    driver.step([driver.schedule(a), driver.schedule(b)])     # prefill kernel over a mixed batch
    driver.decode([a, b], 2)                                  # decode kernel
    for request in (a, b):
        assert_matches_hf(model_dir, driver, request)


# --- the sampler on its own ------------------------------------------------------------------------------------
def sampling_row(params: SamplingParams, prompt=(5, 6, 7), output=(), request: Request | None = None,
                 request_id: str = "r") -> SamplingRow:
    """A row that samples after the sequence's last token (n samples when n > 1: it forks)."""
    request = request or Request(request_id, list(prompt), params)
    seq = request.seqs[0]
    seq.token_ids += list(output)
    return SamplingRow(request.request_id, 0, params, list(seq.token_ids), seq.num_prompt_tokens, params.n)


def test_top_k_top_p_min_p_masks():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]] * 2 + [[0.1, 0.2, 0.3, 0.4, 0.0]])
    logits[2] = torch.tensor([0.1, 0.2, 0.3, 0.4, 1e-9]).log()
    out = apply_top_k_top_p(logits, torch.tensor([2, 5, 5]), torch.tensor([1.0, 1.0, 0.45]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True, False]
    assert torch.equal(out[1], logits[1])
    assert torch.isfinite(out[2]).tolist() == [False, False, True, True, False]    # 0.4 + 0.3 reach 0.45
    out = apply_top_k_top_p(logits[2:], torch.tensor([5]), torch.tensor([0.35]))
    assert torch.isfinite(out[0]).tolist() == [False, False, False, True, False]

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.equal(apply_min_p(probs, torch.tensor([0.2])), torch.tensor([[0.5, 0.3, 0.15, 0.0]]))


def test_penalties():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.0]])
    prompt, output = [[0, 4]], [[2, 2, 3]]
    repetition_only = apply_penalties(logits, prompt, output, torch.zeros(1), torch.zeros(1), torch.tensor([1.5]))
    hf = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0, 4, 2, 2, 3]]), logits.clone())
    assert torch.allclose(repetition_only, hf)
    out = apply_penalties(logits, prompt, output, torch.tensor([0.25]), torch.tensor([0.5]), torch.ones(1))
    assert torch.allclose(out, torch.tensor([[2.0, -1.0, 3.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25, -2.0]]))


def test_seeded_sampler_reproducible_across_batches_and_runs():
    torch.manual_seed(0)
    target_logits = torch.randn(50)

    def draws(sampler: Sampler, position: int, batch_size: int, steps: int = 8) -> list[int]:
        request = Request("seeded", [1, 2], SamplingParams(temperature=0.8, top_k=20, seed=42))
        tokens = []
        for _ in range(steps):
            rows = [sampling_row(SamplingParams(temperature=1.0), request_id=f"o{i}") for i in range(batch_size - 1)]
            rows.insert(position, sampling_row(request.sampling_params, request=request))
            logits = torch.randn(batch_size, 50)
            logits[position] = target_logits
            token = sampler(logits, rows)[position].token_ids[0]
            tokens.append(token)
            request.seqs[0].token_ids.append(token)
        return tokens

    alone = draws(Sampler(()), 0, 1)
    assert len(set(alone)) > 1
    assert draws(Sampler(()), 2, 4) == alone and draws(Sampler(()), 0, 1) == alone

    def fork(seed: int) -> list[int]:
        row = sampling_row(SamplingParams(n=3, temperature=1.0, seed=seed), request_id="fork")
        return Sampler(())(torch.zeros(1, 1000), [row])[0].token_ids
    assert fork(7) == fork(7) and fork(7) != fork(8) and len(set(fork(7))) == 3


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]])      # eos 2 first, stop token 3 second
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    sampler = Sampler((2,))
    assert sampler(logits, [sampling_row(params, output=[4])])[0].token_ids == [4]
    assert sampler(logits, [sampling_row(params, output=[4, 4])])[0].token_ids == [2]
    ignore_eos = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert sampler(logits, [sampling_row(ignore_eos)])[0].token_ids == [2]


def test_logprobs_are_raw_model_logprobs():
    torch.manual_seed(1)
    logits = torch.randn(2, 30)
    rows = [sampling_row(SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0)),
            sampling_row(SamplingParams(temperature=0))]
    results = Sampler(())(logits, rows)
    raw = logits.log_softmax(-1)
    top3 = raw[0].topk(3)
    chosen = results[0].token_ids[0]
    assert results[0].logprobs[0] == pytest.approx({chosen: raw[0, chosen].item(),
                                                     **dict(zip(top3.indices.tolist(), top3.values.tolist()))})
    assert results[1].logprobs is None and results[1].token_ids == [logits[1].argmax().item()]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    rows = [sampling_row(SamplingParams(temperature=1.0, n=4000), request_id="many")]
    tokens = Sampler(())(probs.log()[None], rows)[0].token_ids
    frequencies = torch.bincount(torch.tensor(tokens), minlength=3) / len(tokens)
    assert torch.allclose(frequencies, probs, atol=0.03)
    # temperature sharpens, greedy rows in a sampling batch stay argmax
    rows = [sampling_row(SamplingParams(temperature=0.1, n=500), request_id="cold"),
            sampling_row(SamplingParams(temperature=0))]
    cold, greedy = Sampler(())(probs.log()[None].repeat(2, 1), rows)
    assert cold.token_ids.count(0) > 490 and greedy.token_ids == [0]


# --- CUDA only: graphs and memory profiling --------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_graph_decode_matches_eager(tiny_model):  # noqa: F811
    """Three sequences replay the batch-4 graph (one padding row) and must decode exactly as eager mode does."""
    model_dir = tiny_model("llama")

    def run(enforce_eager: bool):
        runner = ModelRunner(EngineConfig.from_kwargs(model=model_dir, device="cuda", dtype="float16", block_size=16,
                                                      max_model_len=256, max_num_seqs=8, enforce_eager=enforce_eager))
        runner.allocate_kv_cache(64, 8)
        driver = Driver(runner)
        requests = [Request(f"r{i}", random_prompt(n, seed=i), GREEDY_20) for i, n in enumerate((7, 13, 30))]
        driver.step([driver.schedule(r) for r in requests])
        driver.decode(requests, 19)
        return driver, requests

    eager, eager_requests = run(enforce_eager=True)
    graphed, graphed_requests = run(enforce_eager=False)
    assert not eager.runner.graphs and graphed.runner.graph_batch_sizes == [1, 2, 4, 8]
    hf = hf_model(model_dir).to("cuda", torch.float16)
    for a, b in zip(eager_requests, graphed_requests):
        assert a.seqs[0].output_token_ids == b.seqs[0].output_token_ids
        eager_logits = torch.stack(eager.logits[a.seqs[0].seq_id])
        assert (eager_logits - torch.stack(graphed.logits[b.seqs[0].seq_id])).abs().max() < 1e-2
        with torch.no_grad():     # the Triton kernels in fp16 against transformers in fp16, teacher-forced
            tokens = torch.tensor([a.seqs[0].token_ids[:-1]], device="cuda")
            ref = hf(tokens).logits[0, a.seqs[0].num_prompt_tokens - 1:].float()
        assert (eager_logits - ref).abs().max() < 3e-2
    hf.to("cpu", torch.float32)


@needs_cuda
def test_gpu_memory_profile(tiny_model):  # noqa: F811
    runner = ModelRunner(EngineConfig.from_kwargs(model=tiny_model("qwen2"), device="cuda", max_model_len=256,
                                                  max_num_batched_tokens=1024, gpu_memory_utilization=0.5))
    report = runner.profile_num_blocks()
    assert report["peak_activation"] > 0 and report["weights"] > 0
    assert report["kv_cache"] == int(report["total"] * 0.5 - report["weights"] - report["peak_activation"]
                                     - report["non_torch"])
    assert report["num_gpu_blocks"] == report["kv_cache"] // runner.bytes_per_block > 0
