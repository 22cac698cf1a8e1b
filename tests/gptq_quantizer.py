"""A small GPTQ quantizer that writes checkpoints in AutoGPTQ's format (checkpoint_format "gptq"), so the loader is
tested on the layout a real GPTQ checkpoint has. It rounds to nearest per group with a zero point (GPTQ's
quantizer without its Hessian-guided error correction, which only changes the values).

Per linear layer of the decoder (W [out, in]), the checkpoint holds
  qweight int32 [in / 8, out]      4-bit q[k, n], 8 input rows per int32 (nibble i: row 8r + i)
  qzeros  int32 [in / G, out / 8]  4-bit zero points minus 1, 8 columns per int32 (nibble i: column 8c + i)
  scales  fp16  [in / G, out]
  g_idx   int32 [in]               each input row's group: k // G
with W[n, k] ~ (q[k, n] - (qzeros[k // G, n] + 1)) * scale[k // G, n].
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedlab.models.loader import iterate_weights
from tests.awq_quantizer import MAX_INT


def pack_nibbles(values: torch.Tensor, dim: int) -> torch.Tensor:
    """int 4-bit values -> int32 with 8 consecutive entries along dim in one int32 (entry i in nibble i)."""
    values = values.to(torch.int32).movedim(dim, -1)
    values = values.reshape(*values.shape[:-1], -1, 8)
    packed = torch.zeros(values.shape[:-1], dtype=torch.int32)
    for nibble in range(8):
        packed |= values[..., nibble] << (4 * nibble)
    return packed.movedim(-1, dim).contiguous()


def gptq_quantize(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    max_val, min_val = groups.amax(dim=-1), groups.amin(dim=-1)
    scales = ((max_val - min_val).clamp(min=1e-5) / MAX_INT).half()                # [out, in / G]
    zeros = (-torch.round(min_val / scales.float())).clamp(1, MAX_INT)             # stored as zero - 1 >= 0
    q = (torch.round(groups / scales.float()[..., None]) + zeros[..., None]).clamp(0, MAX_INT)
    q = q.reshape(out_features, in_features).t()                                   # [in, out]
    return {"qweight": pack_nibbles(q, 0), "qzeros": pack_nibbles(zeros.t() - 1, 1),
            "scales": scales.t().contiguous(),
            "g_idx": (torch.arange(in_features) // group_size).to(torch.int32)}


def write_gptq_checkpoint(model_dir: str, out_dir: str, group_size: int) -> str:
    """Quantize the decoder's linear layers of model_dir (the rest in fp16) and write the GPTQ checkpoint."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    tensors = {}
    for name, tensor in iterate_weights(model_dir):
        if name.endswith(".weight") and ".layers." in name and tensor.dim() == 2:
            module = name.removesuffix(".weight")
            tensors.update({f"{module}.{key}": value for key, value in gptq_quantize(tensor, group_size).items()})
        elif not (config.get("tie_word_embeddings") and name == "lm_head.weight"):
            tensors[name] = tensor.half().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    config.update(dtype="float16", torch_dtype="float16", quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in Path(model_dir).iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(path, out / path.name)
    return out_dir
