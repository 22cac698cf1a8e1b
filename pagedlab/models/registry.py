"""HF `architectures` names -> model classes."""
from torch import nn

from pagedlab.models.gemma import GemmaForCausalLM
from pagedlab.models.gpt2 import GPT2LMHeadModel
from pagedlab.models.llama import LlamaForCausalLM
from pagedlab.models.mixtral import MixtureOfExpertsForCausalLM
from pagedlab.models.opt import OPTForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtureOfExpertsForCausalLM,
    "Qwen3MoeForCausalLM": MixtureOfExpertsForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


# model_type -> architecture, for configs that name no `architectures` (GGUF metadata, hand-written configs)
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
               "opt": "OPTForCausalLM", "gpt2": "GPT2LMHeadModel"}


def get_model_class(hf_config) -> type[nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures and hf_config.model_type in MODEL_TYPES:
        architectures = [MODEL_TYPES[hf_config.model_type]]
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"model architecture {architectures or hf_config.model_type!r} is not supported; "
                     f"supported: {', '.join(MODEL_REGISTRY)} (or a config of model_type "
                     f"{', '.join(MODEL_TYPES)})")
