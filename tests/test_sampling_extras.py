"""SamplingParams beyond the basics on a real (tiny, random-weight) model: prompt logprobs equal transformers'
log-softmax, logit_bias / allowed_token_ids / bad_words steer the draw, structured outputs follow their grammar."""
import functools

import pytest
import torch

from pagedlab import LLM, SamplingParams
from tests.core_helpers import check_all_returned
from tests.model_fixtures import load_hf_model, tiny_model  # noqa: F401

PROMPTS = [[1, 17, 33, 65, 5, 9, 120, 44, 3, 77, 21, 8],
           [1, 17, 33, 65, 5, 9, 120, 44, 3, 77, 21, 8, 99, 14, 60],   # shares 12 tokens with the first
           [1, 200, 13], [7]]


@functools.cache
def hf_prompt_logprobs(directory: str) -> list[torch.Tensor]:
    """Per prompt [len - 1, V]: transformers' log-softmax at each prompt position, fp32."""
    model = load_hf_model(directory)
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, :-1].float().log_softmax(dim=-1) for p in PROMPTS]


PROMPT_LOGPROB_SETUPS = {
    "whole": dict(block_size=16),
    "chunked": dict(block_size=4, max_num_batched_tokens=5),
    "prefix-cache": dict(block_size=4, enable_prefix_caching=True),
    "lm-head-passes": dict(block_size=16, max_num_seqs=3),     # 3 LM head rows a pass: prompts span several
}


@pytest.mark.parametrize("setup", PROMPT_LOGPROB_SETUPS)
def test_prompt_logprobs_match_transformers(tiny_model, setup):  # noqa: F811
    directory = tiny_model("llama")
    llm = LLM(directory, dtype="float32", device="cpu", **PROMPT_LOGPROB_SETUPS[setup])
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    if setup == "prefix-cache":     # the prompts' blocks are cached first: prompt logprobs must not use them
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output, expected in zip(PROMPTS, outputs, hf_prompt_logprobs(directory)):
        assert len(output.prompt_logprobs) == len(prompt) and output.prompt_logprobs[0] is None
        assert output.metrics.num_cached_tokens == 0
        if len(prompt) == 1:
            continue
        for position, entry in enumerate(output.prompt_logprobs[1:]):
            token = prompt[position + 1]
            assert entry[token] == pytest.approx(expected[position, token].item(), abs=1e-4)
            top = expected[position].topk(3)
            assert set(entry) == {token, *top.indices.tolist()}
            for t, value in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[t] == pytest.approx(value, abs=1e-4)
    check_all_returned(llm.llm_engine)


def test_prompt_logprobs_bound_the_logits_they_make(tiny_model):  # noqa: F811
    """The LM head runs over at most logit_rows_per_pass rows at a time (what the memory profile measured), however
    many prompt rows a step has: here a 40-token prompt's 39 rows in one step, at 4 rows a pass."""
    from pagedlab.layers.prompt_logprobs import logit_rows_per_pass

    directory = tiny_model("llama")
    llm = LLM(directory, dtype="float32", device="cpu", max_num_seqs=4)
    model = llm.llm_engine.executor.model
    shapes, compute_logits = [], model.compute_logits

    def recording(hidden):
        logits = compute_logits(hidden)
        shapes.append(tuple(logits.shape))
        return logits

    model.compute_logits = recording
    prompt = [1] + [(7 * i) % 250 + 3 for i in range(39)]
    output = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1,
                                                                       prompt_logprobs=2), use_tqdm=False)[0]
    rows = logit_rows_per_pass(llm.llm_engine.config.scheduler)
    assert rows == 4 and max(n for n, _ in shapes) == rows and sum(n for n, _ in shapes) == 1 + 39
    with torch.no_grad():
        expected = load_hf_model(directory)(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(dim=-1)
    assert [entry[token] for entry, token in zip(output.prompt_logprobs[1:], prompt[1:])] == pytest.approx(
        expected[torch.arange(39), torch.tensor(prompt[1:])].tolist(), abs=1e-4)


def test_prompt_logprobs_rejects_bad_values():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


# --- logit_bias, allowed_token_ids, bad_words -------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    from tests.server_fixtures import build_chat_model
    return LLM(build_chat_model(str(tmp_path_factory.mktemp("tiny-chat"))), dtype="float32", device="cpu",
               max_model_len=256)


def run(llm, prompt: str, **params):
    return llm.generate(prompt, SamplingParams(max_tokens=params.pop("max_tokens", 12), **params), use_tqdm=False)[0]


def test_logit_bias_is_clamped_and_steers(chat_llm):
    assert SamplingParams(logit_bias={"5": 1000, 6: -1e9}).logit_bias == {5: 100.0, 6: -100.0}
    out = run(chat_llm, "The quick brown", temperature=0, ignore_eos=True, logit_bias={42: 100})
    assert out.outputs[0].token_ids == [42] * 12
    vocab = chat_llm.llm_engine.vocab_size
    rejected = run(chat_llm, "The quick brown", logit_bias={vocab: 1})
    assert "logit_bias has token ids outside the vocabulary" in rejected.error


def test_allowed_token_ids_limit_the_draw(chat_llm):
    out = run(chat_llm, "The quick brown", temperature=1.0, seed=3, ignore_eos=True, allowed_token_ids=[40, 41, 42],
              max_tokens=24)
    assert set(out.outputs[0].token_ids) <= {40, 41, 42}
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


def test_bad_words_are_never_generated(chat_llm):
    tokenizer = chat_llm.get_tokenizer()
    plain = run(chat_llm, "The quick brown", temperature=0, ignore_eos=True).outputs[0].token_ids
    word = tokenizer.decode([plain[0]])
    assert tokenizer.encode(word, add_special_tokens=False) == [plain[0]]     # a one-token word: always banned
    out = run(chat_llm, "The quick brown", temperature=0, ignore_eos=True, bad_words=[word]).outputs[0]
    assert plain[0] not in out.token_ids and out.token_ids != plain
    # a two-token word: its second token is banned right after its first
    pair = tokenizer.decode(plain[:2])
    assert tokenizer.encode(pair, add_special_tokens=False) == plain[:2]
    out = run(chat_llm, "The quick brown", temperature=0, ignore_eos=True, bad_words=[pair]).outputs[0]
    assert out.token_ids[0] == plain[0] and out.token_ids[1] != plain[1]


# --- structured outputs -----------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"animal": {"enum": ["fox", "dog"]}, "lazy": {"type": "boolean"},
                                            "legs": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["animal", "lazy", "legs"], "additionalProperties": False}


def test_structured_outputs_follow_their_grammar(chat_llm, seed=0):
    import json
    import re

    import jsonschema
    import xgrammar as xgr

    from pagedlab.sampling_params import StructuredOutputsParams as S

    specs = [S(json=SCHEMA), S(regex=r"[a-c]{2,5}-[0-9]{3}"), S(choice=["yes", "no", "maybe \"so\""]),
             S(grammar='root ::= "(" [a-z] [a-z]? [a-z]? ")"'), S(json_object=True)]
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=120, structured_outputs=s, n=2) for s in specs]
    outputs = chat_llm.generate(["The quick brown fox"] * len(specs), params, use_tqdm=False)
    texts = [[c.text for c in o.outputs] for o in outputs]
    assert all(c.finish_reason == "stop" for o in outputs[:4] for c in o.outputs), texts
    for text in texts[0]:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert all(re.fullmatch(r"[a-c]{2,5}-[0-9]{3}", t) for t in texts[1])
    assert all(t in ("yes", "no", 'maybe "so"') for t in texts[2])
    assert all(re.fullmatch(r"\([a-z]{1,3}\)", t) for t in texts[3])
    # any JSON object: a random model's keys may run past max_tokens, but every token stays inside the grammar
    for completion in outputs[4].outputs:
        assert completion.text.startswith("{")
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
        else:
            matcher = xgr.GrammarMatcher(chat_llm.llm_engine.structured.compile(S(json_object=True)))
            assert all(matcher.accept_token(t) for t in completion.token_ids)
    check_all_returned(chat_llm.llm_engine)


def test_invalid_structured_outputs_are_rejected_clearly(chat_llm):
    from pagedlab.sampling_params import StructuredOutputsParams as S

    cases = {"json at properties/a/type": S(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
             "regex": S(regex="(unclosed"), "grammar": S(grammar="root ::= missing_rule")}
    outputs = chat_llm.generate(["hi"] * len(cases), [SamplingParams(structured_outputs=s) for s in cases.values()],
                                use_tqdm=False)
    for what, output in zip(cases, outputs):
        assert output.error.startswith(f"invalid structured_outputs.{what}"), output.error
    with pytest.raises(ValueError, match="exactly one"):
        S(json=SCHEMA, regex="a")
    check_all_returned(chat_llm.llm_engine)
