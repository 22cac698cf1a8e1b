"""A small AWQ quantizer that writes checkpoints in AutoAWQ's GEMM format, so the loader is tested on the format a
real AutoAWQ checkpoint has. It rounds to nearest per group with a zero point (AutoAWQ's pseudo_quantize_tensor
and WQLinear_GEMM.from_linear) but skips AWQ's activation-aware scale search, which only changes the values.

Per linear layer of the decoder (W [out, in]), the checkpoint holds
  qweight int32 [in, out / 8]      4-bit q[k, n], 8 columns per int32 in the order AWQ_PACK_ORDER
  qzeros  int32 [in / G, out / 8]  4-bit zero points, packed the same way
  scales  fp16  [in / G, out]
with W[n, k] ~ (q[k, n] - zero[k // G, n]) * scale[k // G, n], and config.json's "quantization_config" says
{"quant_method": "awq", "bits": 4, "group_size": G, "version": "gemm", "zero_point": true}.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedlab.kernels.reference import AWQ_PACK_FACTOR, AWQ_PACK_ORDER
from pagedlab.models.loader import iterate_weights

MAX_INT = 15    # 4 bits


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] of 4-bit values -> int32 [R, C / 8]: nibble i of each int32 holds column AWQ_PACK_ORDER[i]."""
    values = values.to(torch.int32).reshape(values.shape[0], -1, AWQ_PACK_FACTOR)
    packed = torch.zeros(values.shape[:2], dtype=torch.int32, device=values.device)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        packed |= values[:, :, column] << (4 * nibble)     # nibble 7 sets the sign bit: int32 wraps, as in AutoAWQ
    return packed


def awq_quantize(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """nn.Linear weight [out, in] -> {"qweight", "qzeros", "scales"} in AutoAWQ's GEMM format."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    max_val, min_val = groups.amax(dim=-1), groups.amin(dim=-1)
    scales = ((max_val - min_val).clamp(min=1e-5) / MAX_INT).half()                # [out, in / G]
    zeros = (-torch.round(min_val / scales.float())).clamp(0, MAX_INT)
    q = (torch.round(groups / scales.float()[..., None]) + zeros[..., None]).clamp(0, MAX_INT)
    q = q.reshape(out_features, in_features).t()                                   # [in, out]
    return {"qweight": awq_pack(q), "qzeros": awq_pack(zeros.t()), "scales": scales.t().contiguous()}


def write_awq_checkpoint(model_dir: str, out_dir: str, group_size: int, device: str = "cpu") -> str:
    """Quantize the linear layers of the decoder (every 2-D weight under ".layers.": AutoAWQ's choice for Llama,
    Mistral, Qwen2 and OPT; the embeddings and lm_head stay in fp16) of the HF checkpoint in model_dir, on device,
    and write the AWQ checkpoint, with config and tokenizer files, to out_dir."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    tensors = {}
    for name, tensor in iterate_weights(model_dir):
        if name.endswith(".weight") and ".layers." in name and tensor.dim() == 2:
            module = name.removesuffix(".weight")
            for key, value in awq_quantize(tensor.to(device), group_size).items():
                tensors[f"{module}.{key}"] = value.cpu()
        elif not (config.get("tie_word_embeddings") and name == "lm_head.weight"):
            tensors[name] = tensor.half().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    config.update(dtype="float16", torch_dtype="float16", quantization_config={
        "quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in Path(model_dir).iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(path, out / path.name)
    return out_dir
