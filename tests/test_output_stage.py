"""The output stage (engine/detokenizer.py, engine/output_processor.py): incremental detokenization at a bounded
cost per token, equal to decoding the whole output at the end, and stop strings, wherever they fall in the tokens,
finishing their sequence in the step that completed them (blocks freed) on the offline engine and on the API server's
front end alike."""
from __future__ import annotations

import pytest

from pagedlab import LLM, SamplingParams
from pagedlab.engine.core_messages import CompletionDelta, EngineCoreOutput
from pagedlab.engine.detokenizer import IncrementalDetokenizer
from pagedlab.engine.output_processor import RequestState
from pagedlab.models.catalog import fetch_smollm2
from pagedlab.models.gguf_loader import load_gguf_tokenizer
from tests.core_helpers import check_all_returned
from tests.server_fixtures import build_chat_model

PROMPT = "In the beginning"
TEXT = ("Héllo wörld! 你好，世界 🙂🚀 naïve café — “quotes” <|im_end|> done.  Two  spaces\n\n"
        "new lines, tabs\tand 12345 digits")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    return build_chat_model(str(tmp_path_factory.mktemp("tiny-chat")))


@pytest.fixture(scope="module")
def llm(chat_model) -> LLM:
    return LLM(chat_model, device="cpu", dtype="float32", max_model_len=128, block_size=4)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_gguf_tokenizer(str(fetch_smollm2()))


def greedy(**extra) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "ignore_eos": True, "max_tokens": 24, **extra})


@pytest.fixture(scope="module")
def reference(llm):
    """The prompt's greedy output without stops: its token ids, text, and where each token's text ends."""
    [completion] = llm.generate(PROMPT, greedy(), use_tqdm=False)[0].outputs
    tokenizer = llm.get_tokenizer()
    ends = [len(tokenizer.decode(completion.token_ids[:k + 1], skip_special_tokens=True))
            for k in range(len(completion.token_ids))]
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True) and ends[-1] > 8
    return completion.token_ids, completion.text, ends


class SlowTokenizer:
    """Only `decode` (no tokenizers backend), counting its calls and the ids they decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, []

    def decode(self, ids, skip_special_tokens):
        self.calls.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def decode_one_by_one(tokenizer, ids, **params) -> str:
    detokenizer = IncrementalDetokenizer(tokenizer, SamplingParams(**params))
    for token_id in ids:
        detokenizer.update([token_id])
    return detokenizer.text


# --- incremental detokenization ----------------------------------------------------------------------------------
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_text_equals_the_whole_decode_for_the_real_tokenizer(smollm2_tokenizer, skip_special_tokens):
    """SmolLM2's byte-level BPE: accents, CJK and emoji span several tokens; a special token in the middle."""
    tokenizer = smollm2_tokenizer
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    whole = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert ("<|im_end|>" in whole) is not skip_special_tokens
    assert decode_one_by_one(tokenizer, ids, skip_special_tokens=skip_special_tokens) == whole
    slow = SlowTokenizer(tokenizer)
    assert decode_one_by_one(slow, ids, skip_special_tokens=skip_special_tokens) == whole
    # bounded work a token: two decodes of a few ids each, however long the output is
    assert len(slow.calls) <= 2 * len(ids) and max(slow.calls) <= 6


def test_detokenizing_is_one_decode_step_per_token(llm, reference, monkeypatch):
    """Each output token goes through DecodeStream once for a streaming request and one with stop strings, and
    tokenizer.decode only sees the last few tokens, once (bytes still held when the output ends); a request with
    neither is decoded once, when it finishes. The random model's output is not valid UTF-8 everywhere."""
    import tokenizers.decoders

    real = tokenizers.decoders.DecodeStream
    stepped = []

    class CountingStream:
        def __init__(self, **kwargs):
            self.stream = real(**kwargs)

        def step(self, tokenizer, ids):
            stepped.append(len(ids) if isinstance(ids, list) else 1)
            return self.stream.step(tokenizer, ids)

    monkeypatch.setattr(tokenizers.decoders, "DecodeStream", CountingStream)
    engine = llm.llm_engine
    decodes = []
    decode = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda ids, **kw: decodes.append(len(ids)) or decode(ids, **kw))
    engine.add_request(PROMPT, greedy(), request_id="streamed", stream=True)
    engine.add_request(PROMPT, greedy(stop=["never in this text \x00"]), request_id="with-stop")
    engine.add_request(PROMPT, greedy(), request_id="plain")
    texts, final = {}, {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            completion = output.outputs[0]
            if output.request_id == "streamed":     # every step's text extends the last one
                assert completion.text.startswith(texts.get("streamed", ""))
                texts["streamed"] = completion.text
            if output.finished:
                final[output.request_id] = completion
    token_ids, text, _ = reference
    assert {name: (c.token_ids, c.text) for name, c in final.items()} == {
        name: (token_ids, text) for name in ("streamed", "with-stop", "plain")}
    assert sum(stepped) == len(stepped) == 2 * len(token_ids)
    assert decodes.count(len(token_ids)) == 1       # the plain request's one decode
    assert len(decodes) <= 1 + 2 * 2 and sorted(decodes)[-2] <= 4


# --- stop strings -----------------------------------------------------------------------------------------------
class Spelled:
    """Token t is the text "<t>" (a decode-only tokenizer: the window decoder)."""

    def decode(self, ids, skip_special_tokens):
        return "".join(f"<{i}>" for i in ids)


@pytest.mark.parametrize("include", [False, True])
def test_the_stop_check_sees_only_stops_ending_in_new_text(include):
    """A stop spanning three tokens; a short stop listed with a long one (the overlap window is the longest's); a
    multi-token update cut at the token that completed it; nothing decoded after the stop."""
    params = SamplingParams(stop=["1><2><3", ">"], include_stop_str_in_output=include, min_tokens=2)
    detokenizer = IncrementalDetokenizer(Spelled(), params)
    assert detokenizer.update([9]) is None and detokenizer.text == "<9>"     # ">" is in it, before min_tokens
    assert detokenizer.update([0, 1, 2]) == ">"
    assert detokenizer.num_tokens == 2 and detokenizer.text == ("<9><0>" if include else "<9><0")
    assert detokenizer.update([3]) is None and detokenizer.num_tokens == 2
    long_only = IncrementalDetokenizer(Spelled(), SamplingParams(stop=["1><2><3"], include_stop_str_in_output=include))
    assert long_only.update([1, 2]) is None and long_only.update([3, 4]) == "1><2><3"
    assert long_only.num_tokens == 3 and long_only.text == ("<1><2><3" if include else "<")


def spanning_stop(text: str, ends: list[int]) -> tuple[int, str]:
    """(k, stop): a 2-character stop string made of token k's last character and token k+1's first one, found
    nowhere earlier in the text."""
    for k in range(1, len(ends) - 1):
        if ends[k - 1] < ends[k] < ends[k + 1]:
            stop = text[ends[k] - 1:ends[k] + 1]
            if text.find(stop) == ends[k] - 1:
                return k, stop
    raise AssertionError(f"no token boundary to stop across in {text!r}")


def run_alone(llm, params: SamplingParams):
    """Step one request until it finishes; returns its completion and the engine's last step."""
    engine = llm.llm_engine
    engine.add_request(PROMPT, params)
    while True:
        for output in engine.step():
            if output.finished:
                return output.outputs[0], engine.last_step


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_across_two_tokens_ends_the_sequence_and_frees_its_blocks_that_step(llm, reference, include):
    token_ids, text, ends = reference
    k, stop = spanning_stop(text, ends)
    completion, step = run_alone(llm, greedy(stop=["not there", stop], include_stop_str_in_output=include))
    at = ends[k] - 1
    assert completion.text == (text[:at + len(stop)] if include else text[:at])
    assert completion.token_ids == token_ids[:k + 2]     # up to the token that completed the stop string
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    assert step.num_finished == 1 and step.kv_blocks_used == 0
    assert llm.llm_engine.kv.num_free_blocks == llm.llm_engine.kv.num_blocks
    check_all_returned(llm.llm_engine)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_in_the_first_token(llm, reference, include):
    token_ids, text, ends = reference
    stop = text[:ends[0]][-1]
    assert text.find(stop) == ends[0] - 1
    completion, step = run_alone(llm, greedy(stop=stop, include_stop_str_in_output=include))
    assert completion.text == text[:ends[0] - 1 + (len(stop) if include else 0)]
    assert completion.token_ids == token_ids[:1] and completion.finish_reason == "stop"
    assert step.kv_blocks_used == 0


def test_stop_strings_wait_for_min_tokens_and_the_earliest_one_wins(llm, reference):
    token_ids, text, ends = reference
    k, stop = spanning_stop(text, ends)
    later = text[ends[k + 1] - 1:ends[k + 1] + 1]
    assert text.find(later) > ends[k] - 1 and text.find(stop, ends[k]) == -1, "pick other stops for this output"
    completion, _ = run_alone(llm, greedy(stop=[later, stop]))      # listed first, found later in the text
    assert completion.stop_reason == stop
    completion, _ = run_alone(llm, greedy(stop=[stop], min_tokens=k + 3))
    assert completion.token_ids == token_ids and completion.text == text    # completed before min_tokens: no stop


def test_stop_strings_need_a_tokenizer(llm):
    engine = llm.llm_engine
    tokenizer, engine.tokenizer = engine.tokenizer, None
    try:
        engine.add_request({"prompt_token_ids": [1, 70, 71]}, greedy(stop=["x"]), request_id="no-tokenizer")
        [output] = engine.step()
    finally:
        engine.tokenizer = tokenizer
    assert "stop strings need a tokenizer" in output.error


# --- the API server's front end ---------------------------------------------------------------------------------
def test_the_front_end_cuts_a_delta_at_the_stop_and_reports_it_once(llm, reference):
    """The core's deltas can run past a stop string (it samples on until told): the tokens after the one that
    completed it are dropped with their logprobs, the completion is final, and the core is told once."""
    token_ids, text, ends = reference
    k, stop = spanning_stop(text, ends)
    params = SamplingParams(n=2, stop=[stop], logprobs=0, max_tokens=24)
    state = RequestState("r", PROMPT, [1], params, llm.get_tokenizer(), 0.0)
    logprobs = [{t: -0.5} for t in token_ids]
    other = list(reversed(token_ids[:3]))
    state.update(EngineCoreOutput("r", [CompletionDelta(0, token_ids[:k], logprobs[:k], -0.5 * k),
                                        CompletionDelta(1, other, logprobs[:3], -1.5)]))
    assert not state.stops
    output = state.update(EngineCoreOutput("r", [
        CompletionDelta(0, token_ids[k:k + 4], logprobs[k:k + 4], -0.5 * (k + 4)), CompletionDelta(1, [], [], -1.5)]))
    first = output.outputs[0]
    assert state.stops == [(0, stop)] and not output.finished
    assert (first.text, first.token_ids, first.finish_reason, first.stop_reason) == (
        text[:ends[k] - 1], token_ids[:k + 2], "stop", stop)
    assert len(first.logprobs) == k + 2 and first.cumulative_logprob == pytest.approx(-0.5 * (k + 2))
    assert output.num_new_tokens == [2, 0]
    state.stops = []
    done = state.update(EngineCoreOutput("r", [CompletionDelta(0, token_ids[k + 4:k + 5], logprobs[:1], -9.0),
                                               CompletionDelta(1, [5], [{5: -0.1}], -1.6, "length")]))
    assert done.finished and not state.stops and done.outputs[0].token_ids == token_ids[:k + 2]
    assert done.outputs[1].finish_reason == "length" and done.outputs[1].token_ids == other + [5]


def test_llm_shutdown_is_public_and_final(chat_model):
    with LLM(chat_model, device="cpu", dtype="float32", max_model_len=64) as llm:
        assert llm.generate(PROMPT, greedy(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    llm.shutdown()      # a second time does nothing
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPT, greedy(), use_tqdm=False)
