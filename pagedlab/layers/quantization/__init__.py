"""Weight quantization: "fp8" (an unquantized checkpoint quantized as it loads) and "awq" (AutoAWQ checkpoints).

`get_quantization_config` reads the engine's `quantization` argument together with the checkpoint's config.json,
as vLLM does: a checkpoint that says it is AWQ-quantized loads as AWQ when no quantization is named.
"""
from __future__ import annotations

from pagedlab.config import ConfigError
from pagedlab.layers.quantization.awq import AWQConfig
from pagedlab.layers.quantization.base import QuantizationConfig, QuantMethod, UnquantizedLinearMethod
from pagedlab.layers.quantization.fp8 import Fp8Config

__all__ = ["get_quantization_config", "QuantizationConfig", "QuantMethod", "UnquantizedLinearMethod", "AWQConfig",
           "Fp8Config"]


def get_quantization_config(quantization: str | None, hf_config) -> QuantizationConfig | None:
    checkpoint = getattr(hf_config, "quantization_config", None)
    if checkpoint is not None and not isinstance(checkpoint, dict):
        checkpoint = checkpoint.to_dict()
    method = checkpoint.get("quant_method") if checkpoint else None
    if method is None:
        if quantization == "awq":
            raise ConfigError("quantization='awq' needs an AWQ checkpoint, whose config.json has a "
                              "quantization_config with quant_method 'awq'; this one has none")
        return Fp8Config() if quantization == "fp8" else None
    if method != "awq":
        raise ConfigError(f"the checkpoint is quantized with {method!r}; pagedlab loads 'awq' checkpoints "
                          "(and quantizes unquantized ones with quantization='fp8')")
    if quantization not in (None, "awq"):
        raise ConfigError(f"the checkpoint is AWQ-quantized: quantization={quantization!r} cannot apply to it "
                          "(leave quantization unset or pass 'awq')")
    return AWQConfig.from_checkpoint(checkpoint)
