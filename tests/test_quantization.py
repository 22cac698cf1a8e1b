"""Quantization (FP8 KV cache, FP8 weights, AWQ checkpoints) against the unquantized model.

Three kinds of check:
- exactness: a quantized model computes what transformers computes (float32) with the weights quantized and
  dequantized the same way, so loading (merged shards, AWQ's packing order, biases, tied embeddings) is tested
  apart from quantization error, for Llama, Qwen2 and OPT (and GPT-2, which AutoAWQ does not quantize, for fp8);
- accuracy: logit error and greedy agreement against the unquantized float32 model on data/tiny-llama, a trained
  toy checkpoint (on random weights greedy tokens are near ties, so agreement would mean little);
- the Triton AWQ GEMM in Triton's interpreter against the torch reference and a float64 dequant-matmul written
  here. As in tests/test_kernels.py, when triton was imported without TRITON_INTERPRET=1 those cases are skipped
  and test_awq_gemm_in_interpreter_subprocess runs them in a fresh python.
"""
from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pagedlab import LLM, SamplingParams, kernels
from pagedlab.config import ConfigError, EngineConfig
from pagedlab.engine.llm import DEFAULT_MODEL
from pagedlab.executor.model_runner import ModelRunner
from pagedlab.kernels import reference
from pagedlab.kernels.reference import AWQ_PACK_ORDER, FP8_MAX, quantize_rows_fp8_ref
from pagedlab.layers.linear import MergedLinear
from pagedlab.layers.quantization import AWQConfig, Fp8Config, GPTQConfig
from pagedlab.layers.quantization.awq import AWQLinearMethod
from pagedlab.layers.quantization.fp8 import fp8_scaled_mm, has_fp8_matmul
from tests.awq_quantizer import awq_pack, awq_quantize, write_awq_checkpoint
from tests.gptq_quantizer import gptq_quantize, write_gptq_checkpoint
from tests.model_fixtures import load_hf_model, tiny_model  # noqa: F401
from tests.teacher_forcing import teacher_forced_logits
from tests.interpreter import run_triton_cases_in_interpreter

try:
    from triton.runtime.interpreter import InterpretedFunction

    from pagedlab.kernels import awq, quant
    INTERPRETED = isinstance(awq._awq_gemm_kernel, InterpretedFunction)
except ImportError:
    INTERPRETED = False

# The Triton cases exist only where the interpreter is active; elsewhere
# test_awq_gemm_and_fp8_quantization_in_interpreter_subprocess runs them.
IMPLS = ["reference", "triton"] if INTERPRETED else ["reference"]
PROMPTS = ["In the beginning God created", "And the LORD spake unto Moses, saying", "Blessed are the",
           "The LORD is my shepherd"]
NEW_TOKENS = 32


@pytest.fixture(autouse=True, scope="module")
def reference_kernels_one_thread():
    """Models run through the torch references even in the interpreter (the AWQ GEMM tests call the Triton
    launcher directly), on one torch thread: the models are tiny, and on a shared 2-core machine more threads
    only contend."""
    patch = pytest.MonkeyPatch()
    patch.setattr(kernels, "use_triton", lambda tensor: tensor.is_cuda)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()


# --- the AWQ format and GEMM -----------------------------------------------------------------------------------
def naive_dequantize(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """W [K, N] in float64, unpacking nibble by nibble with AutoAWQ's order table."""
    def unpack(packed):
        values = torch.empty(packed.shape[0], packed.shape[1] * 8, dtype=torch.int64)
        for nibble, column in enumerate(AWQ_PACK_ORDER):
            values[:, column::8] = (packed.long() >> (4 * nibble)) & 0xF
        return values
    group = torch.arange(qweight.shape[0]) // group_size
    return (unpack(qweight) - unpack(qzeros)[group]) * scales.double()[group]


def test_awq_packing_layout():
    columns = torch.arange(8).repeat(2, 1)                          # column j holds the value j
    assert awq_pack(columns).tolist() == [[0x75316420]] * 2         # nibble i holds column AWQ_PACK_ORDER[i]
    assert torch.equal(reference.awq_unpack_ref(awq_pack(columns)), columns)
    fifteen = torch.full((1, 16), 15)                               # nibble 7 sets the int32's sign bit
    assert awq_pack(fifteen).tolist() == [[-1, -1]]
    assert torch.equal(reference.awq_unpack_ref(awq_pack(fifteen)), fifteen)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, K, N, group_size, split_k", [(1, 64, 32, 16, None), (5, 128, 48, 32, 1),
                                                          (19, 128, 80, 64, None), (33, 64, 16, 64, 2)])
def test_awq_gemm(impl, dtype, M, K, N, group_size, split_k):
    g = torch.Generator().manual_seed(zlib.crc32(repr((M, K, N, group_size)).encode()))
    weight = torch.randn(N, K, generator=g)
    quantized = awq_quantize(weight, group_size)
    exact = naive_dequantize(quantized["qweight"], quantized["qzeros"], quantized["scales"], group_size)
    groups = weight.reshape(N, K // group_size, group_size)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(group_size, 1)
    assert ((exact.t() - weight).abs() <= 0.51 * step).all()       # round to nearest: within half a step

    x = torch.randn(M, K, generator=g).to(dtype)
    args = (x, quantized["qweight"], quantized["scales"].to(dtype), quantized["qzeros"], group_size)
    out = reference.awq_gemm_ref(*args) if impl == "reference" else awq.awq_gemm(*args, split_k)
    assert out.shape == (M, N) and out.dtype == dtype
    tolerance = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(out.double(), x.double() @ exact, **tolerance)


def test_awq_gemm_and_fp8_quantization_in_interpreter_subprocess():
    run_triton_cases_in_interpreter(__file__)


# --- fp8 activations, row by row -------------------------------------------------------------------------------
def fp8_rows(rows: int, cols: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x whose row r is fp8 numbers (one of them +-448) times 2^k_r, so quantizing it rounds nothing: it must give
    back those numbers and the scale 2^k_r exactly. The last row is zeros (the smallest scale)."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, cols, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    values[:, cols // 2] = 448 * torch.sign(torch.randn(rows, generator=g)).clamp(min=0).mul(2).sub(1)
    values[-1] = 0
    scales = 2.0 ** torch.randint(-6, 7, (rows, 1), generator=g).float()     # 448 * float32(1 / 448) == 1 exactly
    scales[-1] = torch.tensor(reference.FP8_MIN_SCALE) * (1 / FP8_MAX)
    return (values * scales).to(dtype), values, scales


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, cols", [(2, 16), (5, 96), (3, 5000)])     # 5000 columns: two passes of 4096
def test_fp8_row_quantization(impl, dtype, rows, cols):
    x, values, scales = fp8_rows(rows, cols, dtype, seed=rows * cols)
    fp8, scale = reference.quantize_rows_fp8_ref(x) if impl == "reference" else quant.quantize_rows_fp8(x)
    assert fp8.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1) and scale.dtype == torch.float32
    assert torch.equal(fp8.float(), values) and torch.equal(scale, scales)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows, cols", [(1, 2048), (64, 2048), (200, 14336)])
def test_fp8_row_quantization_on_gpu_rounds_as_torch(rows, cols):
    """Random bf16 activations, where every value rounds: the kernel equals the torch reference bit for bit."""
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 3
    fp8, scale = quant.quantize_rows_fp8(x)
    ref_fp8, ref_scale = reference.quantize_rows_fp8_ref(x)
    assert torch.equal(fp8.view(torch.uint8), ref_fp8.view(torch.uint8)) and torch.equal(scale, ref_scale)


# --- FP8 weights in one layer ----------------------------------------------------------------------------------
def test_fp8_linear_quantizes_each_shard_per_output_channel():
    g = torch.Generator().manual_seed(0)
    shards = [torch.randn(32, 64, generator=g) * scale for scale in (0.01, 3.0)]   # very different magnitudes
    layer = MergedLinear(64, [32, 32], bias=True, quant_config=Fp8Config())
    for i, shard in enumerate(shards):
        layer.weight_loader(layer.weight, shard, i)
        layer.weight_loader(layer.bias, torch.full((32,), float(i)), i)
    weight = torch.cat(shards)
    assert layer.weight.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(layer.weight_scale, weight.abs().amax(dim=1) / FP8_MAX)
    dequantized = layer.weight.float() * layer.weight_scale[:, None]
    assert ((dequantized - weight).abs() <= weight.abs() * 2 ** -4 + layer.weight_scale[:, None] * 2 ** -9).all()

    x = torch.randn(7, 64, generator=g)
    torch.testing.assert_close(layer(x), x @ dequantized.t() + layer.bias)      # the CPU path: dequantized matmul
    # the GPU path: torch._scaled_mm, activations quantized per token (on the CPU too since torch 2.13)
    device = torch.device("cuda" if torch.cuda.is_available() and has_fp8_matmul(torch.device("cuda")) else "cpu")
    x, weight, bias = x.to(device), weight.to(device), layer.bias.to(device)
    scaled = fp8_scaled_mm(x, layer.weight.to(device), layer.weight_scale.to(device), bias)
    exact = x @ weight.t() + bias
    assert scaled.dtype == x.dtype and (scaled - exact).norm() / exact.norm() < 0.05


# --- exactness on every architecture ---------------------------------------------------------------------------
def runner_for(model_dir: str, **kwargs) -> ModelRunner:
    return ModelRunner(EngineConfig.from_kwargs(model=model_dir, device="cpu", max_model_len=64, **kwargs))


def uncached_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return runner.model.compute_logits(runner._forward_uncached(torch.tensor(prompt), [len(prompt)]))


def hf_logits(model: nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def decoder_linears(model: nn.Module):
    """(name, module, weight [out, in]) of every projection in the decoder layers of a transformers model (GPT-2's
    Conv1D stores its weight as [in, out])."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            yield name, module, module.weight.data
        elif type(module).__name__ == "Conv1D":
            yield name, module, module.weight.data.t()


PROMPT = [1, 17, 33, 65, 5, 9, 120, 44, 3, 77, 21, 8, 99, 14]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_fp8_weights_compute_the_dequantized_model(tiny_model, arch):  # noqa: F811
    model_dir = tiny_model(arch)
    runner = runner_for(model_dir, dtype="float32", quantization="fp8")
    hf = load_hf_model(model_dir)
    for _, _, weight in decoder_linears(hf):
        fp8, scale = quantize_rows_fp8_ref(weight)
        weight.copy_(fp8.float() * scale)
    torch.testing.assert_close(uncached_logits(runner, PROMPT), hf_logits(hf, PROMPT), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_awq_checkpoint_computes_its_dequantized_weights(tiny_model, arch, tmp_path):  # noqa: F811
    """AutoAWQ quantizes the decoder layers' linears and stores everything else in fp16: transformers gets the
    same weights, dequantized from the checkpoint's own tensors."""
    awq_dir = write_awq_checkpoint(tiny_model(arch), str(tmp_path / "awq"), group_size=32)
    runner = runner_for(awq_dir, dtype="float32")           # quantization comes from config.json
    assert all(isinstance(m.quant_method, AWQLinearMethod) for m in runner.model.modules() if hasattr(m, "qweight"))
    hf = load_hf_model(tiny_model(arch))
    for param in hf.parameters():       # not .half(): that would also round buffers (rotary inv_freq)
        param.data = param.data.half().float()
    tensors = load_file(str(Path(awq_dir) / "model.safetensors"))
    for name, _, weight in decoder_linears(hf):
        weight.copy_(naive_dequantize(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"],
                                      tensors[f"{name}.scales"], 32).t())
    torch.testing.assert_close(uncached_logits(runner, PROMPT), hf_logits(hf, PROMPT), atol=1e-4, rtol=1e-4)


def test_awq_model_through_the_triton_gemm(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """The model's calls into the Triton GEMM (merged shards with a bias, prefill and single-token M) give what
    the reference GEMM gives. Attention runs uncached here (SDPA), so only the GEMM goes through Triton."""
    runner = runner_for(write_awq_checkpoint(tiny_model("qwen2"), str(tmp_path / "awq"), group_size=32))
    expected = [uncached_logits(runner, prompt) for prompt in (PROMPT, PROMPT[:1])]
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: True)
    for prompt, logits in zip((PROMPT, PROMPT[:1]), expected):
        torch.testing.assert_close(uncached_logits(runner, prompt), logits, atol=1e-4, rtol=1e-4)


if not INTERPRETED:      # it runs in test_awq_gemm_in_interpreter_subprocess instead
    del test_awq_model_through_the_triton_gemm


# --- GPTQ: repacked into AWQ's layout as it loads, through the same GEMM ----------------------------------------
def naive_gptq_dequantize(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """W [K, N] in float64, nibble by nibble: row 8r + i of qweight's row r, column 8c + i of qzeros' column c."""
    q = torch.empty(qweight.shape[0] * 8, qweight.shape[1], dtype=torch.int64)
    zeros = torch.empty(qzeros.shape[0], qzeros.shape[1] * 8, dtype=torch.int64)
    for nibble in range(8):
        q[nibble::8] = (qweight.long() >> (4 * nibble)) & 0xF
        zeros[:, nibble::8] = (qzeros.long() >> (4 * nibble)) & 0xF
    groups = g_idx.long()
    return (q - (zeros[groups] + 1)) * scales.double()[groups]


@pytest.mark.parametrize("impl", IMPLS)
def test_gptq_weights_repacked_for_the_awq_gemm_compute_the_gptq_dequantization(impl):
    """The torch GPTQ reference equals the nibble-by-nibble dequantization, and the AWQ GEMM over the repacked
    tensors (Triton in the interpreter) equals x @ that reference."""
    g = torch.Generator().manual_seed(7)
    K, N, group_size = 128, 48, 32
    tensors = gptq_quantize(torch.randn(N, K, generator=g), group_size)
    # a stored zero of 15 - 1 in nibble 7 of an int32: its sign bit set
    tensors["qzeros"][0, 0] = ((int(tensors["qzeros"][0, 0]) & 0x0FFFFFFF) | (14 << 28)) - (1 << 32)
    w = reference.gptq_dequantize_ref(tensors["qweight"], tensors["qzeros"], tensors["scales"].float(),
                                      tensors["g_idx"])
    assert torch.equal(w.double(), naive_gptq_dequantize(tensors["qweight"], tensors["qzeros"],
                                                          tensors["scales"], tensors["g_idx"]))
    repacked = dict(GPTQConfig(group_size).checkpoint_tensors(
        (f"layer.{name}", tensor) for name, tensor in tensors.items()))
    assert "layer.g_idx" not in repacked
    x = torch.randn(5, K, generator=g)
    args = (x, repacked["layer.qweight"], repacked["layer.scales"].float(), repacked["layer.qzeros"], group_size)
    out = reference.awq_gemm_ref(*args) if impl == "reference" else awq.awq_gemm(*args, None)
    torch.testing.assert_close(out, x @ w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gptq_checkpoint_computes_its_dequantized_weights(tiny_model, arch, tmp_path):  # noqa: F811
    """A GPTQ checkpoint the test quantized: transformers gets the weights the torch GPTQ reference dequantizes."""
    gptq_dir = write_gptq_checkpoint(tiny_model(arch), str(tmp_path / "gptq"), group_size=32)
    runner = runner_for(gptq_dir, dtype="float32")           # quantization comes from config.json
    assert isinstance(runner.model.model.layers[0].self_attn.qkv_proj.quant_method, AWQLinearMethod)
    hf = load_hf_model(tiny_model(arch))
    for param in hf.parameters():
        param.data = param.data.half().float()
    tensors = load_file(str(Path(gptq_dir) / "model.safetensors"))
    for name, _, weight in decoder_linears(hf):
        weight.copy_(reference.gptq_dequantize_ref(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"],
                                                   tensors[f"{name}.scales"].float(), tensors[f"{name}.g_idx"]).t())
    torch.testing.assert_close(uncached_logits(runner, PROMPT), hf_logits(hf, PROMPT), atol=1e-4, rtol=1e-4)


def test_gptq_act_order_and_other_formats_are_refused():
    with pytest.raises(ConfigError, match="desc_act"):
        GPTQConfig.from_checkpoint({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True})
    with pytest.raises(ConfigError, match="4 bits"):
        GPTQConfig.from_checkpoint({"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False})
    shuffled = torch.arange(64, dtype=torch.int32).flip(0) // 32
    with pytest.raises(ValueError, match="act-order"):
        list(GPTQConfig(32).checkpoint_tensors([("layer.g_idx", shuffled)]))


def test_quantization_settings_that_cannot_work(tiny_model, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="needs an AWQ checkpoint"):
        runner_for(tiny_model("llama"), quantization="awq")
    awq_dir = write_awq_checkpoint(tiny_model("llama"), str(tmp_path / "awq"), group_size=64)
    with pytest.raises(ConfigError, match="AWQ-quantized: quantization='fp8' cannot apply"):
        runner_for(awq_dir, quantization="fp8")
    with pytest.raises(ConfigError, match="runs in float16 on cuda, not bfloat16"):
        AWQConfig(128).check_dtype(torch.bfloat16, torch.device("cuda"))
    with pytest.raises(ConfigError, match="4 bits"):
        AWQConfig.from_checkpoint({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm",
                                   "zero_point": True})
    with pytest.raises(ConfigError, match="power of two"):
        AWQConfig.from_checkpoint({"quant_method": "awq", "bits": 4, "group_size": 48, "version": "gemm",
                                   "zero_point": True})
    with pytest.raises(ValueError, match="divisible by the group size 64"):
        MergedLinear(96, [64], bias=False, quant_config=AWQConfig(64))


# --- FP8 KV cache capacity -------------------------------------------------------------------------------------
def test_fp8_kv_cache_holds_twice_the_blocks_in_the_same_budget():
    budget = dict(dtype="float16", cpu_kv_cache_space=2 ** -10, swap_space=2 ** -10)     # 1 MiB each
    half = runner_for(DEFAULT_MODEL, **budget)
    fp8 = runner_for(DEFAULT_MODEL, kv_cache_dtype="fp8", **budget)
    assert half.bytes_per_block == 2 * fp8.bytes_per_block
    half_report, fp8_report = half.profile_num_blocks(), fp8.profile_num_blocks()
    assert fp8_report["num_gpu_blocks"] == 2 * half_report["num_gpu_blocks"] > 0
    assert fp8_report["num_cpu_blocks"] == 2 * half_report["num_cpu_blocks"] > 0
    # calibrated per layer: distinct K and V scales, none of them the uncalibrated 1.0
    scales = [s.item() for layer in fp8.attention_layers for s in (layer.k_scale, layer.v_scale)]
    assert len(set(scales)) == len(scales) and 1.0 not in scales


# --- accuracy on a trained model -------------------------------------------------------------------------------
def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [o.prompt_token_ids + o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def unquantized():
    """The float32 model's greedy sequences and its teacher-forced logits over them."""
    llm = LLM(DEFAULT_MODEL, device="cpu", dtype="float32")
    sequences = greedy(llm)
    return sequences, [teacher_forced_logits(llm, s) for s in sequences]


# mode -> (LLM arguments, largest mean relative logit error, smallest teacher-forced top-1 agreement);
# awq runs on data/tiny-llama quantized by tests/awq_quantizer.py (group size 128)
ACCURACY = {
    "fp8-kv-cache": (dict(dtype="float32", kv_cache_dtype="fp8"), 0.02, 0.95),
    "fp8-weights": (dict(dtype="float32", quantization="fp8"), 0.025, 0.93),
    "awq-4bit-g128": (dict(dtype="float16", quantization="awq"), 0.08, 0.85),
}


@pytest.mark.parametrize("mode", ACCURACY)
def test_accuracy_against_unquantized(unquantized, mode, tmp_path_factory, record_property):
    """Teacher-forced on the unquantized model's greedy continuations (32 tokens after each of 4 prompts): logit
    error over every position, top-1 agreement over the generated ones; then free-running greedy agreement."""
    sequences, reference_logits = unquantized
    arguments, max_relative_error, min_agreement = ACCURACY[mode]
    model = DEFAULT_MODEL
    if arguments.get("quantization") == "awq":
        model = write_awq_checkpoint(DEFAULT_MODEL, str(tmp_path_factory.mktemp("tiny-llama-awq")), group_size=128)
    llm = LLM(model, device="cpu", **arguments)
    logits = [teacher_forced_logits(llm, s) for s in sequences]
    errors = [(q - r) for q, r in zip(logits, reference_logits)]
    max_abs = max(e.abs().max().item() for e in errors)
    relative = torch.cat([e.norm(dim=-1) / r.norm(dim=-1) for e, r in zip(errors, reference_logits)]).mean().item()
    generated = [(q[-NEW_TOKENS - 1:-1].argmax(-1), torch.tensor(s[-NEW_TOKENS:])) for q, s in zip(logits, sequences)]
    agreement = sum((ours == theirs).sum().item() for ours, theirs in generated) / (NEW_TOKENS * len(PROMPTS))
    free_running = greedy(llm)
    free_agreement = sum(a == b for ours, theirs in zip(free_running, sequences)
                         for a, b in zip(ours[-NEW_TOKENS:], theirs[-NEW_TOKENS:])) / (NEW_TOKENS * len(PROMPTS))
    numbers = dict(max_abs_logit_error=max_abs, mean_relative_logit_error=relative,
                   teacher_forced_top1_agreement=agreement, free_running_greedy_agreement=free_agreement)
    for name, value in numbers.items():
        record_property(name, round(value, 4))
    print(f"\n{mode}: " + ", ".join(f"{name} {value:.4f}" for name, value in numbers.items()))
    assert relative <= max_relative_error and agreement >= min_agreement, numbers


def test_fp8_kv_scales_follow_each_layers_magnitudes(unquantized, tmp_path, record_property):
    """The same function with K 100x larger and V 1000x smaller (q_proj and o_proj compensate): with a fixed scale
    of 1.0 K would saturate and V fall into fp8's subnormals (mean relative logit error 0.27, top-1 agreement 0.61
    when measured); the calibrated per-layer scales keep the error of the original model."""
    shutil.copytree(DEFAULT_MODEL, tmp_path, dirs_exist_ok=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name in tensors:
        for projection, factor in (("k_proj", 100.0), ("q_proj", 0.01), ("v_proj", 1e-3), ("o_proj", 1e3)):
            if f".{projection}." in name:
                tensors[name] = tensors[name] * factor
    save_file(tensors, str(tmp_path / "model.safetensors"))
    sequences, reference_logits = unquantized
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", kv_cache_dtype="fp8")
    logits = [teacher_forced_logits(llm, s) for s in sequences]
    relative = torch.cat([(q - r).norm(dim=-1) / r.norm(dim=-1) for q, r in zip(logits, reference_logits)]).mean()
    record_property("mean_relative_logit_error", round(relative.item(), 4))
    assert relative < 0.02
