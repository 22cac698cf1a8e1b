"""The model the lab's live engine runs: SmolLM2-135M-Instruct (a real chat model, GGUF) once `make models` has
fetched it; else the embedded tiny Llama trained on the KJV, or a random-weight stand-in of the same shape with a
byte-level tokenizer where it has not been trained yet (the memory pictures are the same; the text is
gibberish)."""
from __future__ import annotations

import os
import shutil
import tempfile

from pagedlab.engine.llm import DEFAULT_MODEL
from pagedlab.models.catalog import smollm2_path
from pagedlab.models.loader import load_hf_config

STAND_IN_DIR = os.path.join(tempfile.gettempdir(), "pagedlab-random-tiny-llama")


def lab_model() -> str:
    """The live engine's model: on a GPU the real instruct model when it is there; else the toy
    (`lab_model_dir`). On a 2-core CPU SmolLM2 takes over a second per step of a busy batch, too slow for a
    live plot; pass its path (`smollm2_path()`) as the model to chat with it anyway."""
    import torch

    path = smollm2_path()
    return str(path) if path is not None and torch.cuda.is_available() else lab_model_dir()


def kv_bytes_per_token(model: str, dtype_bytes: int = 4) -> int:
    """K and V of one token in every layer, from the model's config (fp32, 4 bytes, as the CPU runs it)."""
    config = load_hf_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def model_label(model: str) -> str:
    """A short name for the model the engine loaded."""
    return os.path.basename(model.rstrip("/")).removesuffix(".gguf")


def lab_model_dir() -> str:
    if os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        return DEFAULT_MODEL
    if not os.path.isfile(os.path.join(STAND_IN_DIR, "config.json")):
        _build_stand_in(STAND_IN_DIR)
    return STAND_IN_DIR


def _build_stand_in(directory: str) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    # Written aside, then renamed: notebooks executed side by side may build it at the same time.
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    alphabet = specials + pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    staging = tempfile.mkdtemp(prefix="pagedlab-tiny-")
    model.save_pretrained(staging)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(staging)
    try:
        os.rename(staging, directory)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
