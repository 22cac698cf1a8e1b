"""Weight quantization: "fp8" (an unquantized checkpoint quantized as it loads), "awq" (AutoAWQ checkpoints) and
"gptq" (AutoGPTQ checkpoints, repacked into AWQ's layout as they load).

`get_quantization_config` reads the engine's `quantization` argument together with the checkpoint's config.json,
as vLLM does: a checkpoint that says it is AWQ- or GPTQ-quantized loads so when no quantization is named.
"""
from __future__ import annotations

from pagedlab.config import ConfigError
from pagedlab.layers.quantization.awq import AWQConfig
from pagedlab.layers.quantization.base import QuantizationConfig, QuantMethod, UnquantizedLinearMethod
from pagedlab.layers.quantization.fp8 import Fp8Config
from pagedlab.layers.quantization.gptq import GPTQConfig

__all__ = ["get_quantization_config", "QuantizationConfig", "QuantMethod", "UnquantizedLinearMethod", "AWQConfig",
           "Fp8Config", "GPTQConfig"]


def get_quantization_config(quantization: str | None, hf_config) -> QuantizationConfig | None:
    checkpoint = getattr(hf_config, "quantization_config", None)
    if checkpoint is not None and not isinstance(checkpoint, dict):
        checkpoint = checkpoint.to_dict()
    method = checkpoint.get("quant_method") if checkpoint else None
    if method is None:
        if quantization in ("awq", "gptq"):
            article = "an" if quantization == "awq" else "a"
            raise ConfigError(f"quantization={quantization!r} needs {article} {quantization.upper()} checkpoint, whose "
                              f"config.json has a quantization_config with quant_method {quantization!r}; this one "
                              "has none")
        return Fp8Config() if quantization == "fp8" else None
    if method not in ("awq", "gptq"):
        raise ConfigError(f"the checkpoint is quantized with {method!r}; pagedlab loads 'awq' and 'gptq' "
                          "checkpoints (and quantizes unquantized ones with quantization='fp8')")
    if quantization not in (None, method):
        raise ConfigError(f"the checkpoint is {method.upper()}-quantized: quantization={quantization!r} cannot "
                          f"apply to it (leave quantization unset or pass {method!r})")
    return (AWQConfig if method == "awq" else GPTQConfig).from_checkpoint(checkpoint)
