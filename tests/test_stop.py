"""check_stop: the one stop check after each token (EOS, stop_token_ids, max_tokens, max_model_len), with
min_tokens and ignore_eos."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedlab import SamplingParams
from pagedlab.sequence import FinishReason, Request
from pagedlab.stop import check_stop, stops_only_by_length

EOS = {2}


def after(outputs, max_model_len=100, prompt=(5, 6, 7), **params):
    """The sequence after each of `outputs` is appended and checked: (reason, stop_reason, tokens out) of the
    first stop, or None."""
    request = Request("r", list(prompt), SamplingParams(**params))
    seq = request.seqs[0]
    for token in outputs:
        seq.token_ids.append(token)
        if check_stop(request, seq, EOS, max_model_len):
            return seq.finish_reason, seq.stop_reason, seq.num_output_tokens
    assert seq.finish_reason is None
    return None


def test_eos_stops_with_stop():
    assert after([9, 2, 9]) == (FinishReason.STOP, None, 2)


def test_ignore_eos_runs_past_it():
    assert after([9, 2, 9], ignore_eos=True) is None
    assert after([9, 2, 9], ignore_eos=True, stop_token_ids=[2]) == (FinishReason.STOP, 2, 2)   # still a stop id


def test_a_stop_token_id_is_the_stop_reason():
    assert after([9, 11, 9], stop_token_ids=[11, 12]) == (FinishReason.STOP, 11, 2)


def test_max_tokens_stops_with_length():
    assert after([9, 9, 9, 9], max_tokens=3) == (FinishReason.LENGTH, None, 3)


def test_max_model_len_stops_with_length():
    assert after([9] * 10, max_model_len=6) == (FinishReason.LENGTH, None, 3)     # 3 prompt + 3 out


def test_min_tokens_holds_back_eos_and_stop_ids_not_length():
    assert after([2, 11, 2, 9], min_tokens=3, stop_token_ids=[11]) == (FinishReason.STOP, None, 3)
    assert after([11, 11, 11], min_tokens=3, stop_token_ids=[11]) == (FinishReason.STOP, 11, 3)
    assert after([2, 2, 2], min_tokens=3, max_tokens=3, ignore_eos=True) == (FinishReason.LENGTH, None, 3)


def test_a_stop_token_at_the_last_allowed_position_is_a_stop():
    assert after([9, 2], max_tokens=2) == (FinishReason.STOP, None, 2)


@given(tokens=st.lists(st.integers(0, 12), min_size=1, max_size=12), max_tokens=st.integers(1, 12),
       min_tokens=st.integers(0, 3), ignore_eos=st.booleans(),
       stop_ids=st.lists(st.integers(0, 12), max_size=2), eos=st.sampled_from([set(), {2}]))
def test_only_length_can_stop_what_stops_only_by_length_says(tokens, max_tokens, min_tokens, ignore_eos, stop_ids,
                                                             eos):
    """The decode runs of the simulator rely on this: such a sequence stops exactly at its length."""
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens), ignore_eos=ignore_eos,
                            stop_token_ids=stop_ids)
    if not stops_only_by_length(params, eos):
        return
    request = Request("r", [1, 1], params)
    seq = request.seqs[0]
    for token in tokens:
        seq.token_ids.append(token)
        stopped = check_stop(request, seq, eos, 64)
        assert stopped == (seq.num_tokens >= request.max_total_tokens(64))
        if stopped:
            assert seq.finish_reason is FinishReason.LENGTH
            break


@pytest.mark.parametrize("allocator", ["paged", "static"])
def test_the_engine_stops_through_check_stop(allocator):
    from tests.core_helpers import run_to_end, sim_engine
    engine = sim_engine(allocator=allocator)
    engine.scheduler.eos_token_ids = {8}           # the simulator's token after 8 tokens is 8
    engine.add_request({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=20), request_id="eos")
    engine.add_request({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=20, min_tokens=7),
                       request_id="min")
    engine.add_request({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=20, stop_token_ids=[6],
                                                                       ignore_eos=True), request_id="stop_id")
    outputs = run_to_end(engine)
    assert outputs["eos"].outputs[0].token_ids == [3, 4, 5, 6, 7, 8]
    assert outputs["eos"].outputs[0].finish_reason == "stop"
    assert len(outputs["min"].outputs[0].token_ids) == 20         # EOS came before min_tokens: never again
    stop_id = outputs["stop_id"].outputs[0]
    assert stop_id.token_ids == [3, 4, 5, 6] and stop_id.stop_reason == 6
