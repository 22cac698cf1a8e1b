"""The OpenAI-compatible server end to end on 127.0.0.1, its engine core in its own process: the official openai
client, streaming, bad input, schema fuzzing, live metrics, 200 concurrent streaming clients (half of them hanging up)
leaking nothing, a dying core, and `pagedlab serve` with two API servers draining on SIGTERM."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import signal
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from pagedlab.engine.async_engine import AsyncLLMEngine
from pagedlab.engine.core_messages import (
    AddRequest, CompletionDelta, EngineCoreOutput, EngineCoreOutputs, encoder, input_decoder, output_decoder)
from pagedlab.entrypoints.openai.api_server import build_app
from pagedlab.outputs import RequestMetrics
from pagedlab.sampling_params import SamplingParams
from tests.server_fixtures import ServerThread, build_chat_model

API_KEY = "sk-test"
MODEL = "tiny-chat"
ENGINE_ARGS = dict(device="cpu", dtype="float32", max_model_len=256, swap_space=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_chat_model(str(tmp_path_factory.mktemp("tiny-chat")))


@pytest.fixture(scope="module")
def server(model_dir):
    engine = AsyncLLMEngine.build(model_dir, num_gpu_blocks_override=2048, enable_prefix_caching=True,
                                  **ENGINE_ARGS)
    with ServerThread(build_app(engine, MODEL, api_key=API_KEY)) as url:
        yield SimpleNamespace(url=url, engine=engine,
                              http=httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                                                timeout=60),
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0))
    engine.shutdown()


def metric(text: str, name: str, **labels) -> float:
    """One sample of a Prometheus exposition (0 when absent)."""
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + selector + '}') if selector else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until_idle(server, timeout: float = 20) -> str:
    """Metrics once nothing runs or waits (aborts of hung-up clients arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.http.get("/metrics").text
        if metric(text, "pagedlab:num_requests_running") == metric(text, "pagedlab:num_requests_waiting") == 0:
            return text
        assert time.monotonic() < deadline, "requests still running"
        time.sleep(0.05)


def assert_nothing_leaked(server) -> None:
    text = wait_until_idle(server)
    assert metric(text, "pagedlab:kv_cache_usage_perc") == 0
    assert "\npagedlab:triton_compiles_after_startup 0.0" in text     # the warm-up left nothing to compile
    stats = server.http.get("/stats").json()
    assert stats["blocks"]["free"] + stats["blocks"]["cached"] == stats["num_blocks"] and not stats["requests"]


def greedy(**extra) -> dict:
    return dict(model=MODEL, temperature=0, extra_body={"ignore_eos": True, **extra.pop("extra_body", {})}, **extra)


# --- the process boundary ---------------------------------------------------------------------------------------
def test_the_wire_carries_sampling_params_whole_and_outputs_as_deltas():
    params = SamplingParams(n=2, temperature=0.5, stop=["x"], max_tokens=7, logprobs=1)
    params.a_field_added_later = {"json": {"type": "object"}}      # travels without the wire knowing it
    message = AddRequest.make("r", [1, 2, 3], params, 12.5, 1, stream=False)
    decoded = input_decoder().decode(encoder().encode(message))
    assert isinstance(decoded, AddRequest) and decoded.prompt_token_ids == [1, 2, 3] and not decoded.stream
    assert vars(decoded.params()) == vars(params)
    outputs = EngineCoreOutputs([EngineCoreOutput("r", [CompletionDelta(0, [5, 6], [{5: -0.1}, {6: -0.2}], -0.3)]),
                                 EngineCoreOutput("s", [CompletionDelta(0, [], finish_reason="stop", stop_reason="x")],
                                                  finished=True, metrics=RequestMetrics(1.0, 1.1, 1.2, 1.3, 1.4, 16))])
    again = output_decoder().decode(encoder().encode(outputs))
    assert again == outputs and again.outputs[1].metrics.num_cached_tokens == 16


# --- the official client ----------------------------------------------------------------------------------------
def test_completions_chat_models_and_tokenize(server):
    client = server.client
    completion = client.completions.create(prompt="The quick brown fox", max_tokens=12, **greedy())
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens == server.http.post("/tokenize", json={"prompt": "The quick brown fox"}
                                                              ).json()["count"]
    chat = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "hello there"}],
                                          max_completion_tokens=10, **greedy())
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 10
    tokenized = server.http.post("/tokenize", json={"messages": [{"role": "user", "content": "hello there"}]}).json()
    assert tokenized["count"] == chat.usage.prompt_tokens - len(server.engine.tokenizer.encode(
        "Be brief.\n", add_special_tokens=False)) and tokenized["max_model_len"] == 256
    batch = client.completions.create(prompt=["a b c", "d e f"], max_tokens=4, **greedy())
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.completion_tokens == 8
    token_ids = client.completions.create(prompt=[[1, 70, 71], [1, 72]], max_tokens=3, **greedy())
    assert token_ids.usage.prompt_tokens == 5 and token_ids.usage.completion_tokens == 6
    [card] = client.models.list().data
    assert card.id == MODEL and card.model_extra["max_model_len"] == 256
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_streamed_text_equals_non_streamed(server):
    client = server.client
    prompt = "A scheduler batches requests"
    plain = client.completions.create(prompt=prompt, max_tokens=24, **greedy())
    chunks = list(client.completions.create(prompt=prompt, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}, **greedy()))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()

    messages = [{"role": "user", "content": "hello"}]
    plain_chat = client.chat.completions.create(messages=messages, max_tokens=24, **greedy())
    stream = list(client.chat.completions.create(messages=messages, max_tokens=24, stream=True, **greedy()))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == plain_chat.choices[0].message.content


def test_n_samples_stop_strings_and_logprobs(server):
    client = server.client
    sampled = client.completions.create(model=MODEL, prompt="Blocks are", n=3, max_tokens=8, temperature=1.0,
                                        seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2] and sampled.usage.completion_tokens == 24
    assert len({c.text for c in sampled.choices}) > 1

    full = client.completions.create(prompt="In the beginning", max_tokens=24, **greedy()).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    stopped = client.completions.create(prompt="In the beginning", max_tokens=24, stop=[stop], **greedy())
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(prompt="In the beginning", max_tokens=24, stop=stop, stream=True,
                                         **greedy())
    assert "".join(c.choices[0].text for c in streamed) == cut

    logprobs = client.completions.create(prompt="hello", max_tokens=5, logprobs=2, **greedy()).choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(2 <= len(t) <= 3 for t in logprobs.top_logprobs)
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=5, logprobs=True,
                                          top_logprobs=3, **greedy()).choices[0].logprobs.content
    assert len(chat) == 5 and all(len(t.top_logprobs) == 3 for t in chat)
    # greedy: the chosen token is the most likely one
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in chat)


def test_stop_strings_are_found_by_the_front_end_and_end_sequences_in_the_core(server):
    """The API server decodes and finds the stop string; the core finishes the sequences (finish reason stop in its
    metrics, blocks back), for n=2 and with include_stop_str_in_output, streamed or not."""
    client = server.client
    full = client.completions.create(prompt="The paged cache", max_tokens=24, **greedy()).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = full[:full.index(stop)]
    before = metric(server.http.get("/metrics").text, "pagedlab:request_success_total", finished_reason="stop")
    # max_tokens far beyond the stop: the core must not finish by length before the front end's word reaches it
    both = client.completions.create(prompt="The paged cache", max_tokens=200, n=2, stop=stop, **greedy(
        extra_body={"include_stop_str_in_output": True}))
    assert [(c.text, c.finish_reason, c.stop_reason) for c in both.choices] == [(cut + stop, "stop", stop)] * 2
    assert both.usage.completion_tokens < 2 * 24
    streamed = list(client.completions.create(prompt="The paged cache", max_tokens=200, stop=[stop], stream=True,
                                              **greedy()))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"
    assert_nothing_leaked(server)
    text = server.http.get("/metrics").text
    assert metric(text, "pagedlab:request_success_total", finished_reason="stop") == before + 2


def test_metrics_and_stats_follow_the_engine(server):
    before = server.http.get("/metrics").text
    for _ in range(2):      # the second run finds the first one's prompt blocks in the prefix cache
        server.client.completions.create(prompt="The paged cache held every token " * 3, max_tokens=6, **greedy())
    with server.client.completions.create(prompt="hi", max_tokens=200, stream=True, **greedy()) as stream:
        next(iter(stream))
        stats = server.http.get("/stats").json()
    after = wait_until_idle(server)
    for name in ("pagedlab:generation_tokens_total", "pagedlab:prompt_tokens_total",
                 "pagedlab:prefix_cache_queries_total", "pagedlab:prefix_cache_hits_total",
                 "pagedlab:e2e_request_latency_seconds_count", "pagedlab:time_to_first_token_seconds_count",
                 "pagedlab:inter_token_latency_seconds_count"):
        assert metric(after, name) > metric(before, name), name
    reasons = {"finished_reason": "length"}
    assert metric(after, "pagedlab:request_success_total", **reasons) >= \
        metric(before, "pagedlab:request_success_total", **reasons) + 2
    assert 'pagedlab:cache_config_info{' in after and 'block_size="16"' in after and 'num_gpu_blocks="2048"' in after

    assert stats["queues"]["running"] == 1 and stats["num_blocks"] == 2048
    assert sum(stats["blocks"].values()) == 2048 and stats["blocks"]["used"] >= 1
    [request] = stats["requests"]
    assert request["status"] == "running" and request["gpu_blocks"] >= 1 and request["num_seqs"] == 1
    assert stats["memory"]["tokens"] > 0 and 0 < stats["memory"]["usage"] <= 1 and stats["last_step"]["num_running"]
    idle = server.http.get("/stats").json()
    assert idle["requests"] == [] and idle["blocks"]["used"] == idle["blocks"]["shared"] == 0


# --- errors -----------------------------------------------------------------------------------------------------
def test_api_key_is_required_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2stdGVzdA=="}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/metrics").status_code == 200        # only /v1 is protected


LONG = "word " * 400
BAD_INPUT = [   # (endpoint, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 12}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": LONG, "stream": True}, 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 100000}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "min_tokens": 2, "stop_token_ids": [10 ** 6]}, 400,
     "stop_token_ids"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 10 ** 6]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[]]}, 400, None),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "stream": True}, 400,
     None),
    ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, None),
    ("/v1/embeddings", {"model": MODEL, "input": "hi"}, 404, None),
]


def test_bad_input_gets_openai_errors_while_others_are_served(server):
    with server.client.completions.create(prompt="hello", max_tokens=200, stream=True, **greedy()) as bystander:
        chunks = iter(bystander)
        next(chunks)
        for path, body, status, param in BAD_INPUT:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = server.http.post(path, content=content, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (path, body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            if param is not None:
                assert error["param"] == param, (body, error)
            if body in ({"model": MODEL, "prompt": LONG}, {"model": MODEL, "prompt": LONG, "stream": True}):
                assert "more than max_model_len (256)" in error["message"]     # the engine's own reason
        rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert server.client.completions.create(prompt="still here", max_tokens=4, **greedy()).usage.completion_tokens == 4
    assert_nothing_leaked(server)


# --- schema fuzzing ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(model_dir):
    """A small engine of its own: short max_model_len and a small cache, so valid requests stay cheap."""
    engine = AsyncLLMEngine.build(model_dir, max_num_seqs=16, num_gpu_blocks_override=64, block_size=4,
                                  **{**ENGINE_ARGS, "max_model_len": 48})
    with ServerThread(build_app(engine, MODEL)) as url:
        yield SimpleNamespace(url=url, engine=engine)
    engine.shutdown()


@pytest.fixture(scope="module")
def fuzzed_api(small_server):
    yield schemathesis.openapi.from_url(f"{small_server.url}/openapi.json")
    if small_server.engine.is_running:
        assert httpx.get(f"{small_server.url}/stats").json()["requests"] == []


# schemathesis' own pytest loader (schema.parametrize / from_fixture) breaks on pytest 9, so its Hypothesis
# strategies drive the test instead: every operation of the OpenAPI document, valid and invalid inputs.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schema_fuzz_never_gets_a_server_error(fuzzed_api, mode):
    for result in fuzzed_api.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue        # nothing to get wrong
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case):
            if isinstance(case.body, dict):
                case.body["model"] = MODEL          # random names only meet the 404 (BAD_INPUT covers that)
                for key in ("max_tokens", "max_completion_tokens"):
                    if isinstance(case.body.get(key), int) and case.body[key] > 8:
                        case.body[key] = 8
            case.call_and_validate(checks=[not_a_server_error])
        call()


@pytest.fixture(scope="module")
def tp_server(model_dir):
    """A tensor-parallel core: rank 0, which spawns rank 1."""
    engine = AsyncLLMEngine.build(model_dir, tensor_parallel_size=2, num_gpu_blocks_override=64, **ENGINE_ARGS)
    with ServerThread(build_app(engine, MODEL)) as url:
        yield SimpleNamespace(url=url, engine=engine)
    engine.shutdown()


def test_tensor_parallel_core_matches_one_rank(server, tp_server):
    body = dict(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0, ignore_eos=True)
    one_rank = server.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    two_ranks = httpx.post(f"{tp_server.url}/v1/completions", json=body, timeout=60).json()
    assert two_ranks["choices"][0]["text"] == one_rank and two_ranks["usage"]["completion_tokens"] == 8


def test_a_dead_core_gets_503s_and_health_says_so(tp_server):
    """Runs last on tp_server: its core is killed mid-stream, and rank 1 goes with it."""
    url, engine = tp_server.url, tp_server.engine
    rank1 = psutil.Process(engine.core_pid).children()
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=dict(model=MODEL, prompt="hi", max_tokens=40,
                                                               ignore_eos=True, stream=True)) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(engine.core_pid, signal.SIGSTOP)        # so the stream cannot end before the kill
            os.kill(engine.core_pid, signal.SIGKILL)
            events = [line for line in lines if line.startswith("data: ")]
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert events[-1] == "data: [DONE]" and "engine core has stopped" in error["message"]
        assert error["type"] == "server_error"
        assert http.get("/health").status_code == 503
        for path, body in (("/v1/completions", dict(model=MODEL, prompt="hi")), ("/v1/chat/completions", dict(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))):
            response = http.post(path, json=body)
            assert response.status_code == 503 and "engine core" in response.json()["error"]["message"]
        assert http.get("/stats").status_code == http.get("/metrics").status_code == 503
    engine.core.process.join(10)
    assert engine.core.process.exitcode == -signal.SIGKILL
    assert rank1 and psutil.wait_procs(rank1, timeout=30)[1] == []


# --- load -------------------------------------------------------------------------------------------------------
async def stream_clients(url: str, num_clients: int, hang_up_every: int = 0) -> list[str | None]:
    """num_clients concurrent streaming completions; every hang_up_every-th client leaves after its first chunk.
    Returns each client's finish reason (None for those who hung up)."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:

        async def one(i: int) -> str | None:
            hang_up = hang_up_every and i % hang_up_every == 0
            stream = await client.completions.create(
                model=MODEL, prompt=f"Request {i}: the quick brown fox", max_tokens=200 if hang_up else 12,
                temperature=0.8, seed=i, stream=True, extra_body={"ignore_eos": True})
            async with stream:
                finish, text = None, ""
                async for chunk in stream:
                    if hang_up:
                        return None
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                return finish
        return await asyncio.gather(*(one(i) for i in range(num_clients)))


def test_200_concurrent_streams_share_batches_and_leak_nothing(server):
    peak, done = [0], threading.Event()

    def watch() -> None:        # the core's running-batch size, as /metrics reports it
        with httpx.Client(base_url=server.url) as http:
            while not done.is_set():
                peak[0] = max(peak[0], metric(http.get("/metrics").text, "pagedlab:num_requests_running"))
                time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        finishes = asyncio.run(stream_clients(server.url, 200))
    finally:
        done.set()
        watcher.join()
    assert finishes == ["length"] * 200
    assert peak[0] >= 100           # clients joined each other's running batch
    assert_nothing_leaked(server)


def test_64_concurrent_streams_arrive_one_chunk_per_token(server):
    async def run() -> list[int]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            async def one(i: int) -> int:
                stream = await client.completions.create(model=MODEL, prompt=f"Stream {i}", max_tokens=64,
                                                         temperature=1.0, seed=i, stream=True,
                                                         extra_body={"ignore_eos": True})
                return sum([1 async for chunk in stream if chunk.choices])
            return await asyncio.gather(*(one(i) for i in range(64)))
    assert asyncio.run(run()) == [64] * 64


def test_clients_hanging_up_mid_stream_abort_their_requests(server):
    aborted = metric(server.http.get("/metrics").text, "pagedlab:request_success_total", finished_reason="abort")
    finishes = asyncio.run(stream_clients(server.url, 200, hang_up_every=2))
    assert finishes == [None, "length"] * 100
    text = wait_until_idle(server)
    # Each of the 100 hung-up requests wanted 200 tokens; they were aborted, not run to the end.
    assert metric(text, "pagedlab:request_success_total", finished_reason="abort") == aborted + 100
    assert_nothing_leaked(server)


def test_a_client_giving_up_on_a_completion_aborts_it(server):
    aborted = metric(server.http.get("/metrics").text, "pagedlab:request_success_total", finished_reason="abort")

    async def give_up() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=server.http.headers) as client:
            waiting = asyncio.create_task(client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "tell me everything"}], "ignore_eos": True}))
            while not (await client.get("/stats")).json()["requests"]:
                await asyncio.sleep(0.005)
            waiting.cancel()            # closes the connection mid-request
    asyncio.run(give_up())
    text = wait_until_idle(server)
    assert metric(text, "pagedlab:request_success_total", finished_reason="abort") == aborted + 1
    assert_nothing_leaked(server)


# --- the command ------------------------------------------------------------------------------------------------
def spawned_children(pid: int) -> list[psutil.Process]:
    """The processes multiprocessing spawned under pid: the engine core and the API servers."""
    return [p for p in psutil.Process(pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def test_serve_command_with_two_api_servers_drains_on_sigterm(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedlab.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
         "--device", "cpu", "--swap-space", "0", "--cpu-kv-cache-space", "0.01", "--served-model-name", MODEL,
         "--api-server-count", "2"],
        cwd=root, env={**os.environ, "PYTHONPATH": root}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert process.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == MODEL
        children = spawned_children(process.pid)
        assert len(children) == 3           # the core and two API servers
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json=dict(
                model=MODEL, prompt="hi", max_tokens=150, ignore_eos=True, stream=True)) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)          # drains: the stream in flight runs to its end
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if process.poll() is None:
            process.kill()
        log = process.communicate(timeout=30)[0]
    assert re.search(r"KV cache: .* bytes per block = \d+ blocks", log), log
