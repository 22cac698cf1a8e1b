"""benchmarks/random_checkpoint.py writes a model no process holds whole (the Llama-3-70B shape is 131 GiB): on the
tiny shape, in several shards, transformers loads it with no key missing and pagedlab's greedy tokens equal its own."""
import json

import torch
from transformers import AutoModelForCausalLM

from benchmarks.random_checkpoint import write_random_checkpoint
from pagedlab import LLM, SamplingParams
from tests.model_fixtures import hf_greedy


def test_streamed_random_checkpoint_loads_in_transformers_and_pagedlab(tmp_path):
    directory = write_random_checkpoint("tiny", str(tmp_path), torch.float32, seed=0, shard_gib=0.004)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(p.std() > 0.01 for name, p in model.named_parameters() if "norm" not in name)
    prompts = [[1, 5, 99, 300, 7], [1, 1000, 42]]
    llm = LLM(directory, dtype="float32", device="cpu", cpu_kv_cache_space=0.01, max_model_len=64)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(directory, prompts, 6)
