"""The engine end to end on real (tiny, random-weight) models: greedy outputs equal transformers' `generate`
token for token in fp32, whatever the block size, prefix caching, forks, chunking or preemption."""
import pytest

from pagedlab import LLM, SamplingParams
from pagedlab.config import ConfigError
from tests.core_helpers import check_all_returned
from tests.model_fixtures import ARCHITECTURES, tiny_model  # noqa: F401
from tests.model_fixtures import hf_greedy as hf_greedy_tokens

NEW_TOKENS = 12
PROMPTS = [[1, 17, 33, 65, 5, 9, 120, 44, 3, 77, 21, 8],               # 12 tokens
           [1, 17, 33, 65, 5, 9, 120, 44, 3, 77, 21, 8, 99, 14, 60],   # shares 12 tokens with the first
           [1, 200, 13],
           [1, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108]]
_reference: dict[str, list[list[int]]] = {}


def hf_greedy(directory: str, arch: str) -> list[list[int]]:
    if arch not in _reference:
        _reference[arch] = hf_greedy_tokens(directory, PROMPTS, NEW_TOKENS)
    return _reference[arch]


def generate(llm, n=1):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, n=n)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outputs]


SETUPS = {
    "block1": dict(block_size=1, swap_space=0.01),      # 4 GiB of swap would be 10^6 one-token blocks
    "block16": dict(block_size=16),
    "block5-prefix-cache": dict(block_size=5, enable_prefix_caching=True),
    "chunked-prefill": dict(block_size=4, max_num_batched_tokens=7),
    "preempt-recompute": dict(block_size=2, num_gpu_blocks_override=20, max_model_len=40),
    "preempt-swap-fork": dict(block_size=3, num_gpu_blocks_override=24, max_model_len=60, preemption_mode="swap",
                              swap_space=0.01),
}


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(tiny_model, arch, setup):  # noqa: F811
    directory = tiny_model(arch)
    expected = hf_greedy(directory, arch)
    llm = LLM(directory, dtype="float32", device="cpu", **SETUPS[setup])
    n = 2 if "fork" in setup else 1
    got = generate(llm, n)
    assert got == [[e] * n for e in expected]
    if setup == "block5-prefix-cache":
        assert generate(llm) == [[e] for e in expected]       # a second pass, served from the cache
        # Every full prompt block is found again, except the one holding the last token (recomputed for logits).
        assert llm.llm_engine.kv.prefix_hits == sum((len(p) - 1) // 5 * 5 for p in PROMPTS)
    if setup.startswith("preempt"):
        assert llm.llm_engine.totals["preemptions"] > 0
    check_all_returned(llm.llm_engine)


def test_seeded_sampling_is_reproducible_across_batches(tiny_model):  # noqa: F811
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", block_size=4)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True, n=2)
    alone = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0]
    crowd = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [params] + [SamplingParams(
        temperature=1.0, max_tokens=7, ignore_eos=True)] * 3, use_tqdm=False)[0]
    fresh = LLM(tiny_model("llama"), dtype="float32", device="cpu", block_size=16).generate(
        [{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0]
    tokens = [c.token_ids for c in alone.outputs]
    assert tokens == [c.token_ids for c in crowd.outputs] == [c.token_ids for c in fresh.outputs]
    assert tokens[0] != tokens[1]        # the n samples differ


def spelled(ids: list[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


def test_abort_and_a_failing_request_leak_nothing(tiny_model):  # noqa: F811
    llm = LLM(tiny_model("qwen2"), dtype="float32", device="cpu", block_size=4, enable_prefix_caching=True)
    engine = llm.llm_engine
    engine.tokenizer = type("Tokenizer", (), {"decode": lambda self, ids, skip_special_tokens: spelled(ids)})()
    update_text = engine.output_processor._update_text

    def update_text_or_fail(request, seq):
        if request.request_id == "r2" and seq.num_output_tokens == 3:
            raise RuntimeError("detokenizer broke")
        return update_text(request, seq)
    engine.output_processor._update_text = update_text_or_fail
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request({"prompt_token_ids": p}, params, request_id=f"r{i}", stream=True)
    engine.step()
    engine.step()
    assert engine.abort_request("r1").outputs[0].finish_reason == "abort"
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert done["r2"].outputs[0].finish_reason == "error" and "detokenizer broke" in done["r2"].error
    expected = hf_greedy(tiny_model("qwen2"), "qwen2")
    assert done["r0"].outputs[0].token_ids == expected[0] and done["r3"].outputs[0].token_ids == expected[3]
    assert done["r0"].outputs[0].text == spelled(expected[0])
    check_all_returned(engine)


def test_prompt_longer_than_max_model_len_fails_alone(tiny_model):  # noqa: F811
    llm = LLM(tiny_model("gpt2"), dtype="float32", device="cpu", max_model_len=16)
    outs = llm.generate([{"prompt_token_ids": list(range(1, 30))}, {"prompt_token_ids": PROMPTS[2]}],
                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert "more than max_model_len (16)" in outs[0].error
    assert len(outs[1].outputs[0].token_ids) == 4


def test_kv_cache_too_small_says_what_fits(tiny_model):  # noqa: F811
    with pytest.raises(ConfigError, match=r"estimated maximum model length is 32"):
        LLM(tiny_model("llama"), device="cpu", block_size=16, num_gpu_blocks_override=2, max_model_len=64)
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        LLM(tiny_model("llama"), device="cpu", gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="model's maximum length"):
        LLM(tiny_model("llama"), device="cpu", max_model_len=100000)


def test_bad_requests_fail_alone_with_their_reason(tiny_model):  # noqa: F811
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", max_num_seqs=4)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(
        [{"prompt_token_ids": [1, 10**6]}, {"prompt_token_ids": PROMPTS[2]}, {"prompt_token_ids": PROMPTS[2]},
         {"prompt_token_ids": PROMPTS[2]}],
        [greedy, SamplingParams(min_tokens=2, stop_token_ids=[10**6], max_tokens=4), SamplingParams(n=5), greedy],
        use_tqdm=False)
    assert "outside the vocabulary [0, 256)" in outs[0].error and "prompt" in outs[0].error
    assert "stop_token_ids" in outs[1].error
    assert "max_num_seqs=4" in outs[2].error
    assert outs[3].error is None and outs[3].outputs[0].token_ids == hf_greedy(tiny_model("llama"), "llama")[2][:4]
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    check_all_returned(llm.llm_engine)


def test_chat_and_text_prompts_on_the_embedded_model():
    from pagedlab.engine.llm import DEFAULT_MODEL
    llm = LLM(DEFAULT_MODEL, device="cpu", dtype="float32")
    conversation = [{"role": "user", "content": "Who made the earth?"}]
    out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    expected_prompt = llm.get_tokenizer().apply_chat_template(conversation, add_generation_prompt=True,
                                                              tokenize=True, return_dict=False)
    assert out.prompt_token_ids == list(expected_prompt)
    assert len(out.outputs[0].token_ids) == 8 and out.outputs[0].text.strip()
    text = llm.generate("In the beginning", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0]
    assert text.prompt == "In the beginning" and text.outputs[0].text == llm.get_tokenizer().decode(
        text.outputs[0].token_ids, skip_special_tokens=True)


def test_sliding_window_does_not_cap_the_model_length_and_model_type_stands_in_for_architectures(
        tiny_model, tmp_path):  # noqa: F811
    """Gemma 3's window is 5 here, its positions 256: max_model_len 256 is allowed, 257 is not. A config that names
    no `architectures` (GGUF metadata, hand-written configs) is built from its model_type."""
    import json
    import shutil

    directory = shutil.copytree(tiny_model("gemma3"), tmp_path / "gemma3")
    config = json.loads((directory / "config.json").read_text())
    del config["architectures"]
    (directory / "config.json").write_text(json.dumps(config))
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=256)
    assert llm.llm_engine.config.scheduler.max_model_len == 256
    assert generate(llm) == [[e] for e in hf_greedy(tiny_model("gemma3"), "gemma3")]
    with pytest.raises(ConfigError, match=r"model's maximum length \(256\)"):
        LLM(str(directory), device="cpu", max_model_len=257)


def test_moe_experts_load_from_per_expert_and_fused_checkpoints_alike(tiny_model):  # noqa: F811
    """Mixtral's w1/w3/w2 per expert, or transformers' fused experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I]."""
    import re

    import torch

    from pagedlab.models.loader import iterate_weights, load_hf_config, load_model

    directory = tiny_model("mixtral")
    config = load_hf_config(directory)
    per_expert = load_model(directory, config, torch.float32, torch.device("cpu"))
    tensors = dict(iterate_weights(directory))
    fused, experts = {}, {}
    for name, tensor in tensors.items():
        if match := re.match(r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(w\d)\.weight", name):
            experts.setdefault(match[1], {})[(int(match[2]), match[3])] = tensor
        else:
            fused[name] = tensor
    for layer, parts in experts.items():
        count = len(parts) // 3
        fused[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "w1")], parts[(e, "w3")]]) for e in range(count)])
        fused[f"{layer}.mlp.experts.down_proj"] = torch.stack([parts[(e, "w2")] for e in range(count)])
    model = type(per_expert)(config)
    model.load_weights(fused.items())
    for (name, a), (_, b) in zip(per_expert.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name
