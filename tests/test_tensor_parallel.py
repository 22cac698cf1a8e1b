"""Tensor parallelism on the CPU over gloo (and, where 2 GPUs are present, over NCCL with CUDA graphs): TP=2 greedy
outputs equal TP=1's and transformers' token for token in fp32, for GQA (a KV head per rank), one KV head replicated
on both ranks with a padded vocabulary, GPT-2's fused c_attn and Mixtral's experts; with block swaps, copy-on-write
copies, prefix caching and chunked prefill crossing the rank boundary. The sharded loaders are checked layer by
layer, quantized layers included; the clear errors come before any process starts, a rank that fails to start fails
the engine, and no worker outlives its engine.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers import GenerationConfig

from pagedlab import LLM, SamplingParams
from pagedlab import events as ev
from pagedlab.config import ConfigError
from pagedlab.distributed import parallel_state
from pagedlab.distributed.parallel_state import TensorParallelGroup
from pagedlab.events import Recorder
from pagedlab.executor import tp_executor
from pagedlab.layers.linear import MergedLinear
from pagedlab.layers.parallel import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedlab.layers.quantization import AWQConfig, Fp8Config
from tests.awq_quantizer import awq_quantize
from tests.core_helpers import check_all_returned
from tests.model_fixtures import TINY_MODELS
from tests.model_fixtures import hf_greedy as hf_greedy_tokens

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 10
PROMPTS = [[1, 17, 33, 65, 5, 9, 120, 44, 3, 77, 21, 8],
           [1, 17, 33, 65, 5, 9, 120, 44, 3, 77, 21, 8, 99, 14, 60],
           [1, 200, 13]]
# small caches: each of the CPU swap space's blocks is a Python object
ENGINE = dict(dtype="float32", device="cpu", cpu_kv_cache_space=0.01, swap_space=0.01)

# name -> (tiny architecture, config overrides, engine setup, samples per prompt)
MODELS = {
    # 4 heads / 2 KV heads: one KV head per rank. Swap preemption and forks: block swaps and copies on every rank.
    "llama-gqa": ("llama", {}, dict(block_size=4, num_gpu_blocks_override=18, max_model_len=60,
                                    preemption_mode="swap"), 2),
    # c_attn holds q, k and v in one tensor; random biases, so the row-parallel bias must be added exactly once.
    "gpt2": ("gpt2", {}, dict(block_size=5, enable_prefix_caching=True, max_num_batched_tokens=7), 1),
    # One KV head, replicated on both ranks; vocabulary 251, padded to 2 x 126; tied embeddings; q/k/v biases.
    "qwen2-mqa": ("qwen2", dict(num_key_value_heads=1, vocab_size=251),
                  dict(block_size=2, num_gpu_blocks_override=20, max_model_len=40), 1),
    # Every expert's gate/up columns and down rows split across the ranks, like the dense MLP; the router replicated.
    "mixtral": ("mixtral", {}, dict(block_size=3), 1),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread here and (through the engine, which passes rank 0's count on) in each worker: on a shared
    2-core machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_checkpoint(directory: Path, arch: str, overrides: dict) -> str:
    """TINY_MODELS[arch] with overrides, and random biases: transformers initializes them to zero, which would hide a
    row-parallel bias added on every rank instead of once."""
    config_name, model_name, kwargs = TINY_MODELS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**{**kwargs, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(str(directory))
    return str(directory)


def hf_greedy(directory: str) -> list[list[int]]:
    return hf_greedy_tokens(directory, PROMPTS, NEW_TOKENS)


def generate(llm: LLM, n: int) -> list[list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, n=n)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outputs]


def shut_down(llm: LLM) -> None:
    executor = llm.llm_engine.executor
    llm.shutdown()
    assert [w.exitcode for w in executor.workers] == [0] * len(executor.workers)
    assert not multiprocessing.active_children()
    assert parallel_state.get_tensor_parallel_group() is None


@pytest.mark.parametrize("name", MODELS)
def test_tp2_greedy_matches_tp1_and_transformers(tmp_path, name):
    arch, overrides, setup, n = MODELS[name]
    directory = build_checkpoint(tmp_path, arch, overrides)
    expected = [[tokens] * n for tokens in hf_greedy(directory)]
    assert generate(LLM(directory, **ENGINE, **setup), n) == expected
    llm = LLM(directory, **ENGINE, **setup, tensor_parallel_size=2)
    try:
        engine = llm.llm_engine
        block_moves = Recorder(engine.bus, {ev.BLOCK_SWAPPED_OUT, ev.BLOCK_SWAPPED_IN, ev.BLOCK_COW})
        assert generate(llm, n) == expected
        if "num_gpu_blocks_override" in setup:
            assert engine.totals["preemptions"] > 0
        if setup.get("preemption_mode") == "swap":
            assert {e.kind for e in block_moves.events} == block_moves.kinds
        if setup.get("enable_prefix_caching"):
            assert generate(llm, n) == expected and engine.kv.prefix_hits > 0
        check_all_returned(engine)
        assert engine.kv_budget["num_gpu_blocks_per_rank"] == [engine.kv.num_blocks] * 2
    finally:
        shut_down(llm)


def test_tp2_prompt_logprobs_in_lm_head_passes_match_tp1(tmp_path):
    """Prompt logprobs run the LM head in passes of max_num_seqs rows (here 2), a gather across the ranks each: the
    ranks make the same passes, and the padded vocabulary's logprobs equal TP=1's."""
    arch, overrides, _, _ = MODELS["qwen2-mqa"]
    directory = build_checkpoint(tmp_path, arch, overrides)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    expected = [o.prompt_logprobs for o in LLM(directory, **ENGINE, max_num_seqs=2).generate(prompts, params,
                                                                                            use_tqdm=False)]
    llm = LLM(directory, **ENGINE, max_num_seqs=2, tensor_parallel_size=2)
    try:
        for output, want in zip(llm.generate(prompts, params, use_tqdm=False), expected):
            assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(want)
            for got, entry in zip(output.prompt_logprobs[1:], want[1:]):
                assert got.keys() == entry.keys()
                assert list(got.values()) == pytest.approx(list(entry.values()), abs=1e-4)
    finally:
        shut_down(llm)


# Llama-3-70B's attention layout (64 query heads, 8 KV heads) on tiny layers: 4 dims a head, hidden 256.
LLAMA_70B_HEADS = dict(hidden_size=256, head_dim=4, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=64)


@pytest.mark.parametrize("size", [4, 8])
def test_llama_70b_head_layout_at_tp4_and_tp8(tmp_path, size, caplog):
    """TP=4 gives each rank 16 query and 2 KV heads, TP=8 8 and 1: greedy equals TP=1 and transformers, each rank
    holds its share of the weights, and the startup log says so."""
    directory = build_checkpoint(tmp_path, "llama", LLAMA_70B_HEADS)
    setup = dict(block_size=4, num_gpu_blocks_override=40, max_model_len=60)
    expected = [[tokens] for tokens in hf_greedy(directory)]
    one = LLM(directory, **ENGINE, **setup)
    assert generate(one, 1) == expected
    whole = one.llm_engine.kv_budget
    caplog.set_level("INFO", logger="pagedlab")
    llm = LLM(directory, **ENGINE, **setup, tensor_parallel_size=size)
    try:
        report = llm.llm_engine.kv_budget
        assert (report["num_heads"], report["num_kv_heads"]) == (64 // size, 8 // size)
        assert report["bytes_per_block"] * size == whole["bytes_per_block"]
        # every rank holds 1/size of each split weight and the whole of the norms and rotary tables
        model = one.llm_engine.executor.model
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        replicated = (sum(nbytes(t) for name, t in model.named_parameters() if "norm" in name)
                      + sum(nbytes(t) for t in model.buffers()))
        split = whole["weight_bytes"] - replicated
        assert report["weight_bytes_per_rank"] == [split // size + replicated] * size
        assert f"each rank holds {64 // size} of 64 query heads and {8 // size} of 8 KV heads" in caplog.text
        assert generate(llm, 1) == expected
        check_all_returned(llm.llm_engine)
    finally:
        shut_down(llm)


def test_torchrun_launch(tmp_path):
    """Under torchrun every rank runs the same script; rank 1 serves inside LLM(...) and exits with rank 0."""
    directory = build_checkpoint(tmp_path / "llama", "llama", {})
    script = tmp_path / "generate.py"
    script.write_text(textwrap.dedent(f"""\
        import json
        from pagedlab import LLM, SamplingParams
        llm = LLM({directory!r}, **{ENGINE!r}, tensor_parallel_size=2)
        params = SamplingParams(temperature=0, max_tokens={NEW_TOKENS}, ignore_eos=True)
        outputs = llm.generate([{{"prompt_token_ids": p}} for p in {PROMPTS!r}], params, use_tqdm=False)
        print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outputs]))
        """))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=100,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS")]
    assert len(lines) == 1      # rank 1 never got past LLM(...)
    assert json.loads(lines[0].removeprefix("TOKENS ")) == hf_greedy(directory)


# --- every rank loads its shard ---------------------------------------------------------------------------------
def as_rank(monkeypatch, rank: int, world_size: int = 2) -> None:
    """Build layers as rank `rank` of `world_size` would (no collectives run)."""
    monkeypatch.setattr(parallel_state, "_group", TensorParallelGroup(rank, world_size, None, None))


def linear_checkpoint(out_features: int, in_features: int, quantization: str | None) -> dict[str, torch.Tensor]:
    weight = torch.randn(out_features, in_features) * 0.1
    tensors = awq_quantize(weight, 16) if quantization == "awq" else {"weight": weight}
    return {**tensors, "bias": torch.randn(out_features)}


def build(layer_class, quantization, *args):
    quant_config = {"fp8": Fp8Config(), "awq": AWQConfig(16), None: None}[quantization]
    return layer_class(*args, quant_config)


def load(layer: MergedLinear, shards: list[dict[str, torch.Tensor]]) -> MergedLinear:
    for index, tensors in enumerate(shards):
        for name, param in layer.named_parameters():
            param.weight_loader(param, tensors[name], index if len(shards) > 1 else None)
    return layer


@pytest.mark.parametrize("quantization", [None, "fp8", "awq"])
def test_each_rank_loads_its_shard(monkeypatch, quantization):
    """Column-parallel outputs concatenate, and row-parallel partial outputs sum, to the one-rank layer's output;
    with one KV head, both ranks hold it. fp8 scales each row-parallel shard on its own: close, not equal."""
    torch.manual_seed(0)
    head_dim, hidden = 16, 64
    qkv_shards = [linear_checkpoint(size, hidden, quantization) for size in (4 * head_dim, head_dim, head_dim)]
    down = linear_checkpoint(hidden, 128, quantization)
    x, x_down = torch.randn(5, hidden), torch.randn(5, 128)

    def layers():
        return (load(build(QKVParallelLinear, quantization, hidden, head_dim, 4, 1, True), qkv_shards),
                load(build(RowParallelLinear, quantization, 128, hidden, True), [down]))

    qkv, row = layers()
    expected_qkv, expected_row = qkv(x).split([4 * head_dim, head_dim, head_dim], -1), row(x_down)
    ranks = []
    for rank in (0, 1):
        as_rank(monkeypatch, rank)
        qkv, row = layers()
        assert (qkv.num_heads, qkv.num_kv_heads) == (2, 1)
        ranks.append((qkv(x).split([2 * head_dim, head_dim, head_dim], -1),
                      MergedLinear.forward(row, x_down[:, rank * 64:(rank + 1) * 64])))     # before the all-reduce
    (q0, k0, v0), (q1, k1, v1) = ranks[0][0], ranks[1][0]
    torch.testing.assert_close(torch.cat([q0, q1], -1), expected_qkv[0])
    for rank_k, rank_v in ((k0, v0), (k1, v1)):
        torch.testing.assert_close(rank_k, expected_qkv[1])
        torch.testing.assert_close(rank_v, expected_qkv[2])
    row_sum = ranks[0][1] + ranks[1][1]
    if quantization == "fp8":
        assert (row_sum - expected_row).norm() < 0.05 * expected_row.norm()
    else:
        torch.testing.assert_close(row_sum, expected_row)


def test_fused_checkpoint_tensor_is_split_before_sharding(monkeypatch):
    """GPT-2's c_attn: one [3h, h] tensor, loaded with shard None, lands as each rank's q, k and v heads."""
    fused = torch.randn(3 * 64, 64)
    as_rank(monkeypatch, 1)
    layer = QKVParallelLinear(64, 16, 4, 4, False)
    layer.weight_loader(layer.weight, fused)
    q, k, v = fused.chunk(3)
    torch.testing.assert_close(layer.weight, torch.cat([q[32:], k[32:], v[32:]]))
    with pytest.raises(ConfigError, match="must divide the output features"):
        ColumnParallelLinear(64, 129, False)


# --- errors -----------------------------------------------------------------------------------------------------
def write_config(directory: Path, **overrides) -> str:
    """A llama config.json and no weights: enough for what fails before weights load."""
    config_name, model_name, kwargs = TINY_MODELS["llama"]
    config = getattr(transformers, config_name)(architectures=[model_name], **{**kwargs, **overrides})
    config.save_pretrained(str(directory))
    return str(directory)


def test_clear_errors_before_any_process_starts(tmp_path, monkeypatch):
    llama = write_config(tmp_path / "llama")       # 4 heads, 2 KV heads
    with pytest.raises(ConfigError, match=r"must divide the number of attention heads \(4\)"):
        LLM(llama, device="cpu", tensor_parallel_size=3)
    twelve_heads = write_config(tmp_path / "12-heads", hidden_size=96, num_attention_heads=12,
                                num_key_value_heads=4)
    with pytest.raises(ConfigError, match=r"number of KV heads \(4\) or be a multiple of it"):
        LLM(twelve_heads, device="cpu", tensor_parallel_size=3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"puts 2 ranks on this machine, one GPU each, but it has 1 GPU"):
        LLM(llama, device="cuda", tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="would put every rank on one GPU"):
        LLM(llama, device="cuda:0", tensor_parallel_size=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ConfigError, match="WORLD_SIZE=4"):
        LLM(llama, device="cpu", tensor_parallel_size=2)
    assert not multiprocessing.active_children()


def test_a_rank_that_fails_to_start_fails_the_engine(tmp_path):
    """Every rank fails to build its layers (129 MLP features do not split in two); the ranks compare notes, rank 0
    raises, and the worker is gone: nothing waits in a collective for a rank that will never come."""
    directory = write_config(tmp_path / "odd-mlp", intermediate_size=129)
    with pytest.raises(ConfigError, match=r"must divide the output features \[129, 129\]"):
        LLM(directory, **ENGINE, tensor_parallel_size=2)
    assert not multiprocessing.active_children()
    assert parallel_state.get_tensor_parallel_group() is None


@pytest.mark.parametrize("rank", [0, 1])
def test_graphs_are_released_before_the_group_is_destroyed(monkeypatch, rank):
    """NCCL destroys a communicator only once every CUDA graph holding one of its collectives is gone: destroying the
    group first hangs (seen on 2 H200s). Both ranks' shutdowns release the runner's graphs first."""
    calls = []

    class Runner:
        def release_cuda_graphs(self):
            calls.append("release graphs")

    monkeypatch.setattr(tp_executor, "broadcast_object", lambda message=None: {"method": "shutdown"})
    monkeypatch.setattr(tp_executor, "destroy_tensor_parallel", lambda: calls.append("destroy group"))
    if rank == 0:
        tp_executor._shut_down([], Runner())
    else:
        monkeypatch.setattr(tp_executor, "_start_rank", lambda *args: Runner())
        tp_executor.serve(None, 1, 1, "env://")
    assert calls == ["release graphs", "destroy group"]


# --- on GPUs: NCCL, CUDA graphs -----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("name", MODELS)
def test_tp2_with_cuda_graphs_on_gpus_matches_transformers(tmp_path, name):
    """Over NCCL with the decode steps replaying CUDA graphs (their all-reduces captured), in fp32 (the Triton kernels'
    dots in full fp32, as torch's matmuls): TP=2 greedy equals transformers', and the engine shuts down."""
    arch, overrides, setup, n = MODELS[name]
    directory = build_checkpoint(tmp_path, arch, overrides)
    llm = LLM(directory, **{**ENGINE, "device": "cuda"}, **setup, gpu_memory_utilization=0.2,
              tensor_parallel_size=2)
    try:
        assert llm.llm_engine.executor.graphs
        assert generate(llm, n) == [[tokens] * n for tokens in hf_greedy(directory)]
    finally:
        shut_down(llm)
