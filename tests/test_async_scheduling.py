"""Async scheduling (SchedulerConfig.async_scheduling): step N+1 is scheduled and launched before step N's tokens
are applied. Greedy outputs still equal transformers' token for token; outputs are the same with it on and off;
a finished sequence's extra token is never emitted and its blocks wait for the step that computed it; the steps that
cannot overlap fall back to synchronous, each for its reason."""
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from pagedlab import LLM, SamplingParams
from pagedlab.async_scheduling import drain_before_scheduling, stops_at_placeholder
from pagedlab.config import ConfigError, EngineConfig, SchedulerConfig
from pagedlab.core.kv_cache_manager import KVCacheManager
from pagedlab.engine.llm_engine import LLMEngine, resolve_async_scheduling
from pagedlab.sampling_params import StructuredOutputsParams
from pagedlab.sched_output import NewSeqData, SampleResult, SchedulerOutput
from pagedlab.scheduler import Scheduler
from pagedlab.sequence import Request
from pagedlab.sim.cost_model import CostModel
from pagedlab.sim.simulator import SimExecutor, VirtualClock
from tests.core_helpers import check_all_returned
from tests.model_fixtures import tiny_model  # noqa: F401
from tests.test_llm import PROMPTS, SETUPS, generate, hf_greedy


def count_gathers(llm) -> list[int]:
    """Wrap the runner's gather so a test sees how many rows of each step took their input id off the device."""
    runner = llm.llm_engine.executor
    gathered, inner = [], runner._gathered_inputs

    def counting(*args):
        dst, src = inner(*args)
        gathered.append(len(dst))
        return dst, src
    runner._gathered_inputs = counting
    return gathered


# --- greedy parity with transformers ----------------------------------------------------------------------------
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_matches_transformers_with_async_scheduling(tiny_model, arch, setup):  # noqa: F811
    directory = tiny_model(arch)
    expected = hf_greedy(directory, arch)
    llm = LLM(directory, dtype="float32", device="cpu", async_scheduling=True, **SETUPS[setup])
    engine = llm.llm_engine
    assert engine.async_scheduling
    gathered = count_gathers(llm)
    n = 2 if "fork" in setup else 1
    assert generate(llm, n) == [[e] * n for e in expected]
    assert sum(gathered) > 0            # decode rows did read their input ids off the device
    if setup == "block5-prefix-cache":
        assert generate(llm) == [[e] for e in expected]
        assert engine.kv.prefix_hits == sum((len(p) - 1) // 5 * 5 for p in PROMPTS)
    if setup.startswith("preempt"):
        assert engine.totals["preemptions"] > 0
        assert engine.sync_steps.get("blocks", 0) > 0      # preemption was decided with nothing in flight
    if n > 1:
        assert engine.sync_steps.get("fork", 0) > 0
    runs = 2 if setup == "block5-prefix-cache" else 1
    assert engine.totals["generation_tokens"] == runs * len(PROMPTS) * n * 12 and engine.discarded_tokens == 0
    check_all_returned(engine)


# --- a finished sequence's extra token -----------------------------------------------------------------------------
def test_extra_token_of_a_finished_sequence_is_dropped_and_its_blocks_wait_for_its_step(tiny_model):  # noqa: F811
    directory = tiny_model("llama")
    sync = LLM(directory, dtype="float32", device="cpu", block_size=1, async_scheduling=False, swap_space=0.01,
              cpu_kv_cache_space=0.01)
    prompt = {"prompt_token_ids": PROMPTS[0]}
    free_run = sync.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids
    stop = free_run[4]
    expected = free_run[:free_run.index(stop) + 1]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop])

    llm = LLM(directory, dtype="float32", device="cpu", block_size=1, async_scheduling=True, cpu_kv_cache_space=0.01,
              swap_space=0.01)
    engine = llm.llm_engine
    request = engine.add_request(prompt, params)
    seq, emitted = request.seqs[0], []
    while True:
        outputs = engine.step()
        emitted += [o.outputs[0].token_ids for o in outputs]
        if request.is_finished:
            break
    # The step that brought the stop token is applied while the next one, with the sequence's extra row, runs:
    # the blocks are still held, for that step writes its extra token's KV into them.
    assert emitted[-1] == expected and outputs[-1].finished and outputs[-1].outputs[0].stop_reason == stop
    assert engine.kv.holds(seq) and len(engine.kv.block_table(seq)) == len(PROMPTS[0]) + len(expected)
    assert engine.has_unfinished_requests()
    assert engine.step() == []          # the extra token: dropped, nothing reported
    assert engine.discarded_tokens == 1 and not engine.kv.holds(seq)
    assert seq.output_token_ids == expected and seq.num_placeholders == 0
    check_all_returned(engine)


def test_abort_in_flight_frees_blocks_after_the_step(tiny_model):  # noqa: F811
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", async_scheduling=True)
    engine = llm.llm_engine
    request = engine.add_request({"prompt_token_ids": PROMPTS[1]},
                                 SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine.step()
    engine.step()       # prefill applied, one decode step in flight
    engine.abort_request(request.request_id)
    assert engine.kv.holds(request.seqs[0])     # the step in flight still writes its blocks
    assert engine.step() == []
    check_all_returned(engine)


# --- on and off: the same outputs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from tests.server_fixtures import build_chat_model
    return build_chat_model(str(tmp_path_factory.mktemp("tiny-chat")))


def mixed_workload():
    """(prompt, params): stop strings, stop tokens, EOS, max_tokens, n > 1, seeds, logprobs, penalties, min_tokens,
    prompt logprobs (the stops are among what this random model writes)."""
    greedy = dict(temperature=0)
    return [
        ("The quick brown fox", SamplingParams(max_tokens=24, ignore_eos=True, **greedy)),
        ("jumps over", SamplingParams(max_tokens=3, ignore_eos=True, **greedy)),
        ("The quick brown fox", SamplingParams(max_tokens=30, stop=[" help"], **greedy)),
        ("over the lazy", SamplingParams(max_tokens=16, stop_token_ids=[246], **greedy)),
        ("the lazy dog", SamplingParams(max_tokens=20, stop=["sly"], include_stop_str_in_output=True, **greedy)),
        ("dog", SamplingParams(max_tokens=10, temperature=0.9, seed=11, logprobs=2, ignore_eos=True)),
        ("brown", SamplingParams(max_tokens=9, temperature=1.0, seed=5, n=3)),     # EOS ends one sample
        ("fox", SamplingParams(max_tokens=12, repetition_penalty=1.3, stop_token_ids=[303], **greedy)),
        ("quick", SamplingParams(max_tokens=8, prompt_logprobs=1, ignore_eos=True, **greedy)),
        ("The", SamplingParams(max_tokens=12, min_tokens=6, stop_token_ids=[366], **greedy)),
    ]


def summary(outputs):
    """Everything an output says; logprobs to 4 decimals (other rows share the steps: fp32 sums differ a little)."""
    def rounded(entries):
        return None if entries is None else [e and {t: round(v, 4) for t, v in e.items()} for e in entries]
    return [(rounded(o.prompt_logprobs), [(c.token_ids, c.text, c.finish_reason, c.stop_reason, rounded(c.logprobs))
                                          for c in o.outputs]) for o in outputs]


def test_outputs_are_the_same_with_async_scheduling_on_and_off(chat_model):
    runs = {}
    for mode in (False, True):
        llm = LLM(chat_model, dtype="float32", device="cpu", max_model_len=256, block_size=4, max_num_seqs=6,
                  async_scheduling=mode)
        prompts, params = zip(*mixed_workload())
        runs[mode] = summary(llm.generate(list(prompts), list(params), use_tqdm=False))
        engine = llm.llm_engine
        check_all_returned(engine)
        if mode:
            assert engine.sync_steps.get("fork", 0) > 0
            assert engine.discarded_tokens > 0                        # EOS, stop strings or stop tokens hit
    assert runs[True] == runs[False]
    reasons = [c[2] for _, completions in runs[True] for c in completions]
    assert "stop" in reasons and "length" in reasons


STRESS = {
    "tight-recompute": dict(block_size=2, num_gpu_blocks_override=24, max_model_len=48),
    "tight-swap-prefix": dict(block_size=3, num_gpu_blocks_override=20, max_model_len=60, preemption_mode="swap",
                              swap_space=0.01, enable_prefix_caching=True),
    "chunks-few-seqs": dict(block_size=4, max_num_batched_tokens=9, max_num_seqs=3, enable_prefix_caching=True),
}


@pytest.mark.parametrize("setup", STRESS)
def test_random_workloads_under_pressure_are_the_same_on_and_off(tiny_model, setup):  # noqa: F811
    """Random prompts (some sharing prefixes), lengths, stop tokens, n and seeds, under preemption, swapping,
    chunking and prefix caching: the same outputs with async scheduling on and off, and every block back."""
    rng = np.random.default_rng(sorted(STRESS).index(setup))
    base = [int(t) for t in rng.integers(3, 250, 12)]
    work = []
    for i in range(10):
        prompt = (base[:int(rng.integers(2, 12))] if i % 3 == 0 else []) + [int(t) for t in
                                                                          rng.integers(3, 250, rng.integers(1, 14))]
        params = dict(max_tokens=int(rng.integers(1, 16)), ignore_eos=bool(rng.integers(2)),
                      stop_token_ids=[int(t) for t in rng.integers(3, 250, 6)], n=int(rng.choice([1, 1, 2])))
        params.update(temperature=0.8, seed=int(rng.integers(1000))) if i % 4 == 1 else params.update(temperature=0)
        work.append(({"prompt_token_ids": prompt}, SamplingParams(**params)))
    runs = {}
    for mode in (False, True):
        llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", async_scheduling=mode, **STRESS[setup])
        outputs = llm.generate([p for p, _ in work], [sp for _, sp in work], use_tqdm=False)
        runs[mode] = [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]
        check_all_returned(llm.llm_engine)
        if setup.startswith("tight"):
            assert llm.llm_engine.totals["preemptions"] > 0
    assert runs[True] == runs[False]


def test_structured_output_steps_are_collected_before_the_next_is_scheduled(chat_model):
    llm = LLM(chat_model, dtype="float32", device="cpu", max_model_len=256, async_scheduling=True)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(regex=r"[a-c]{2,5}-[0-9]{3}"))
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = llm.generate(["The quick brown fox", "over the lazy dog"], [params, plain], use_tqdm=False)
    assert re.fullmatch(r"[a-c]{2,5}-[0-9]{3}", outputs[0].outputs[0].text)
    assert llm.llm_engine.sync_steps.get("structured output", 0) > 0
    check_all_returned(llm.llm_engine)


# --- switching it off, defaults, executors that cannot ----------------------------------------------------------------
def test_switched_off_it_never_launches(tiny_model, monkeypatch):  # noqa: F811
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", async_scheduling=False)
    assert not llm.llm_engine.async_scheduling

    def launch(*args, **kwargs):
        raise AssertionError("the synchronous engine launched a step")
    monkeypatch.setattr(llm.llm_engine.executor, "launch", launch)
    assert generate(llm) == [[e] for e in hf_greedy(tiny_model("llama"), "llama")]


def test_switching_off_between_steps_drains_the_step_in_flight(tiny_model):  # noqa: F811
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", async_scheduling=True)
    engine = llm.llm_engine
    for p in PROMPTS:
        engine.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine.step()
    engine.step()
    engine.async_scheduling = False
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert engine.sync_steps["switched off"] == 1
    assert [done[str(i)] for i in range(len(PROMPTS))] == hf_greedy(tiny_model("llama"), "llama")
    check_all_returned(engine)


def test_off_by_default_and_auto_is_on_for_a_cuda_runner_only():
    class Runner:
        supports_async_scheduling = True

        def __init__(self, device):
            self.device = torch.device(device)

    assert resolve_async_scheduling(EngineConfig(), Runner("cuda")) is False
    default = EngineConfig(scheduler=SchedulerConfig(async_scheduling=None))
    assert resolve_async_scheduling(default, Runner("cuda")) is True
    assert resolve_async_scheduling(default, Runner("cpu")) is False
    on = EngineConfig(scheduler=SchedulerConfig(async_scheduling=True))
    assert resolve_async_scheduling(on, Runner("cpu")) is True
    executor = SimExecutor(CostModel(), VirtualClock(), 16)
    assert resolve_async_scheduling(default, executor) is False     # the simulator steps synchronously
    with pytest.raises(ConfigError, match="async_scheduling=True needs an executor"):
        LLMEngine(on, executor, 256)


def test_tensor_parallel_refuses_it_before_starting_any_rank(tiny_model):  # noqa: F811
    with pytest.raises(ConfigError, match="async_scheduling=True needs tensor_parallel_size 1"):
        LLM(tiny_model("llama"), device="cpu", tensor_parallel_size=2, async_scheduling=True)


def test_the_flag_is_in_every_engine_command():
    from pagedlab.cli import command_parser
    for command in ("generate", "serve", "bench"):
        action = next(a for a in command_parser(command)._actions if a.dest == "async_scheduling")
        assert action.option_strings == ["--async-scheduling", "--no-async-scheduling"] and action.default is False
    parser = command_parser("serve")
    assert parser.parse_args(["--no-async-scheduling"]).async_scheduling is False
    assert parser.parse_args(["--async-scheduling"]).async_scheduling is True


# --- the scheduler's placeholders ----------------------------------------------------------------------------------
def scheduler(num_blocks=16, block_size=4, **config):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_model_len=64, **config), kv), kv


def test_a_placeholder_makes_the_next_step_a_decode_row_with_exact_blocks():
    sched, kv = scheduler()
    request = Request("a", [1, 2, 3, 4], SamplingParams(max_tokens=3))
    sched.add_request(request)
    seq = request.seqs[0]
    sched.schedule()
    first = sched.batch
    assert [s.num_new_tokens for s in first.seqs] == [4] and len(kv.block_table(seq)) == 1
    sched.launched(first)
    assert seq.num_computed_tokens == 4 and seq.num_placeholders == 1
    out = sched.schedule()      # step 2, its input the token step 1 has not returned yet
    second = sched.batch
    assert out.num_scheduled_tokens == [1] and out.num_computed_tokens == [4] and out.num_samples == [1]
    assert out.cached_seqs.new_token_ids == [[]]           # the worker has nothing new: it reads it off the device
    assert len(kv.block_table(seq)) == 2                   # position 4 opened the second block, and only that
    sched.launched(second)
    assert seq.num_placeholders == 2
    assert sched.update_launched(first, [SampleResult([7])]) == []
    assert seq.token_ids == [1, 2, 3, 4, 7] and seq.num_placeholders == 1
    # step 3's token would be the third and last (max_tokens=3): it is surely the end, so nothing is scheduled
    out = sched.schedule()
    assert out.seq_ids == [seq.seq_id] and sched.batch.seqs[0].start_pos == 5
    sched.launched(sched.batch)
    third = sched.batch
    assert stops_at_placeholder(request, seq, 64)
    sched.update_launched(second, [SampleResult([8])])
    assert sched.schedule().seq_ids == []
    finished = sched.update_launched(third, [SampleResult([9])])
    assert finished == [request] and seq.output_token_ids == [7, 8, 9]
    assert kv.num_free_blocks == kv.num_blocks


def test_a_sequence_finished_in_flight_keeps_its_blocks_until_its_last_step_completes():
    sched, kv = scheduler()
    request = Request("a", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=[5]))
    sched.add_request(request)
    seq = request.seqs[0]
    sched.schedule()
    first = sched.batch
    sched.launched(first)
    sched.schedule()
    second = sched.batch
    sched.launched(second)
    assert sched.update_launched(first, [SampleResult([5])]) == [request]    # the stop token
    assert kv.holds(seq) and request not in sched.running                     # step 2 still writes its block
    assert sched.schedule().seq_ids == []
    assert sched.update_launched(second, [SampleResult([6])]) == []         # past the end: dropped
    assert seq.output_token_ids == [5] and not kv.holds(seq) and kv.num_free_blocks == kv.num_blocks


def test_the_drain_check_counts_the_next_step_blocks():
    sched, kv = scheduler(num_blocks=4, block_size=2)
    request = Request("a", [1, 2, 3, 4], SamplingParams(max_tokens=8))
    sched.add_request(request)
    sched.schedule()
    sched.launched(sched.batch)         # 2 blocks held, the next token opens a third
    assert kv.num_free_blocks == 2 and not drain_before_scheduling(sched)
    other = Request("b", [1, 2], SamplingParams(max_tokens=8))
    sched.add_request(other)
    sched.schedule()                    # a's decode row and b's prompt: every block taken
    sched.launched(sched.batch)
    # a's next token fits in its third block; b's opens a block there is none of: a preemption could follow
    assert kv.num_free_blocks == 0 and drain_before_scheduling(sched)


def test_preempting_a_sequence_in_flight_is_refused():
    """What drain_before_scheduling prevents: a preemption decided while a launched step still computes the
    victim (the engine applies that step first)."""
    sched, kv = scheduler(num_blocks=4, block_size=2)
    for name, prompt in (("a", [1, 2, 3]), ("b", [1, 2, 3, 4])):
        sched.add_request(Request(name, prompt, SamplingParams(max_tokens=8)))
    sched.schedule()
    sched.launched(sched.batch)         # both prompts: every block taken; b's next token needs a fifth
    assert kv.num_free_blocks == 0 and drain_before_scheduling(sched)
    with pytest.raises(RuntimeError, match="would be preempted while a launched step computes it"):
        sched.schedule()


# --- the runner's gather -------------------------------------------------------------------------------------------
def test_rows_past_the_workers_tokens_take_the_previous_steps_samples(tiny_model):  # noqa: F811
    from tests.test_model_runner import make_runner
    runner = make_runner(tiny_model("llama"), block_size=4, num_blocks=16)
    params = SamplingParams(temperature=0)
    new = [NewSeqData(10, "a", 0, [1, 2, 3], 3, [0], params), NewSeqData(11, "b", 0, [4, 5, 6, 7], 4, [1, 2], params),
           NewSeqData(12, "c", 0, [8, 9], 2, [3], params)]
    runner.input_batch.update(SchedulerOutput(step=1, new_seqs=new))
    runner._prev_sampled = (torch.tensor([70, 71, 72]), {12: 0, 10: 1, 11: 2})
    # a and b decode the token the previous step sampled (past what the worker holds); c recomputes position 1
    out = SchedulerOutput(step=2, seq_ids=[10, 11, 12], num_scheduled_tokens=[1, 1, 1],
                          num_computed_tokens=[3, 4, 1], num_samples=[1, 1, 1])
    host = runner.prepare(out)
    assert host.num_gathered == 2
    model_input = runner.upload(host)
    assert model_input.input_ids.tolist() == [71, 72, 9]
    assert model_input.positions.tolist() == [3, 4, 1]
    assert model_input.sample_rows.tolist() == [0, 1, 2]
    runner._prev_sampled = None         # synchronous: the host has every token, nothing is gathered
    out = replace(out, num_computed_tokens=[2, 3, 1])
    host = runner.prepare(out)
    assert host.num_gathered == 0 and runner.upload(host).input_ids.tolist() == [3, 7, 9]


def test_a_row_without_a_sample_to_read_is_an_error(tiny_model):  # noqa: F811
    from tests.test_model_runner import make_runner
    runner = make_runner(tiny_model("llama"), block_size=4, num_blocks=16)
    runner.input_batch.update(SchedulerOutput(step=1, new_seqs=[
        NewSeqData(10, "a", 0, [1, 2, 3], 3, [0], SamplingParams(temperature=0))]))
    runner._prev_sampled = (torch.tensor([70]), {99: 0})
    with pytest.raises(RuntimeError, match="placeholders and the worker disagree"):
        runner.prepare(SchedulerOutput(step=2, seq_ids=[10], num_scheduled_tokens=[1], num_computed_tokens=[3],
                                       num_samples=[1]))
    assert np.all(runner.input_batch.num_tokens[:1] == 3)


# --- the server's engine core ------------------------------------------------------------------------------------
def test_the_server_core_steps_with_async_scheduling(chat_model):
    """The engine core (its own process) overlaps steps: completions, streams and stop strings found by the front
    end while the next step is in flight come out as with the synchronous core, and every block comes back."""
    from types import SimpleNamespace

    import httpx
    import openai

    from pagedlab.engine.async_engine import AsyncLLMEngine
    from pagedlab.entrypoints.openai.api_server import build_app
    from tests.server_fixtures import ServerThread
    from tests.test_server import API_KEY, ENGINE_ARGS, MODEL, assert_nothing_leaked, greedy

    expected = {}
    for mode in (False, True):
        engine = AsyncLLMEngine.build(chat_model, num_gpu_blocks_override=512, async_scheduling=mode, **ENGINE_ARGS)
        with ServerThread(build_app(engine, MODEL, api_key=API_KEY)) as url:
            server = SimpleNamespace(http=httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                                                       timeout=60))
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
            full = client.completions.create(prompt="The paged cache", max_tokens=24, **greedy()).choices[0].text
            stop = full[len(full) // 2:len(full) // 2 + 2]
            stopped = client.completions.create(prompt="The paged cache", max_tokens=200, n=2, stop=stop, **greedy())
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                prompt="The paged cache", max_tokens=200, stop=[stop], stream=True, **greedy()))
            sampled = client.completions.create(model=MODEL, prompt="Blocks are", max_tokens=8, temperature=1.0,
                                                seed=7, extra_body={"ignore_eos": True}).choices[0].text
            expected[mode] = (full, [(c.text, c.finish_reason) for c in stopped.choices], streamed, sampled)
            assert streamed == full[:full.index(stop)]
            assert_nothing_leaked(server)
        engine.shutdown()
    assert expected[True] == expected[False]
