"""The server as a drop-in for vLLM's: echo and prompt logprobs, logit_bias, structured outputs, tool calls, the
smaller endpoints and headers, and every documented field applied or refused (the official openai client)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest
import torch

from pagedlab.engine.async_engine import AsyncLLMEngine
from pagedlab.engine.core_proc import CoreProcess
from pagedlab.entrypoints.openai.api_server import build_app
from tests.server_fixtures import ServerThread, build_chat_model

MODEL = "tiny-chat"
PROMPT = "The quick brown fox jumps"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_chat_model(str(tmp_path_factory.mktemp("tiny-chat")))


@pytest.fixture(scope="module")
def server(model_dir):
    """One engine core behind two API servers: the default one, and one with vLLM's auto tool choice and metric
    names."""
    core = CoreProcess(model_dir, 2, device="cpu", dtype="float32", max_model_len=256, swap_space=0,
                       num_gpu_blocks_override=64, enable_prefix_caching=True)
    engine, tools_engine = AsyncLLMEngine(core.connection(0), core), AsyncLLMEngine(core.connection(1))
    tools_app = build_app(tools_engine, MODEL, enable_auto_tool_choice=True, tool_call_parser="hermes",
                          metrics_prefixes=("pagedlab", "vllm"), max_request_body_size=1 << 16)
    try:
        with ServerThread(build_app(engine, MODEL)) as url, ServerThread(tools_app) as tools_url:
            yield SimpleNamespace(url=url, engine=engine, tokenizer=engine.tokenizer,
                                  http=httpx.Client(base_url=url, timeout=60),
                                  tools_http=httpx.Client(base_url=tools_url, timeout=60),
                                  client=openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0),
                                  tools=openai.OpenAI(base_url=f"{tools_url}/v1", api_key="x", max_retries=0))
    finally:
        tools_engine.shutdown()
        engine.shutdown()


def greedy(**extra) -> dict:
    return dict(model=MODEL, temperature=0, **extra)


# --- echo and prompt logprobs -----------------------------------------------------------------------------------
def test_echo_gives_the_prompt_and_its_logprobs_as_transformers_does(server, model_dir):
    from transformers import AutoModelForCausalLM

    ids = server.tokenizer.encode(PROMPT)
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    expected = hf.log_softmax(dim=-1)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()

    only_prompt = server.client.completions.create(prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, **greedy())
    choice = only_prompt.choices[0]
    assert choice.text == PROMPT and only_prompt.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(choice.logprobs.tokens) == server.tokenizer.decode(ids)

    echoed = server.client.completions.create(prompt=PROMPT, max_tokens=4, echo=True, logprobs=0, **greedy(),
                                              extra_body={"ignore_eos": True})
    plain = server.client.completions.create(prompt=PROMPT, max_tokens=4, **greedy(), extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert len(echoed.choices[0].logprobs.tokens) == len(ids) + 4
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        prompt=PROMPT, max_tokens=4, echo=True, stream=True, **greedy(), extra_body={"ignore_eos": True}))
    assert streamed == echoed.choices[0].text

    # vLLM's prompt_logprobs extra: per prompt token {id: {logprob, rank, decoded_token}}, the first None
    extra = server.client.completions.create(prompt=PROMPT, max_tokens=1, **greedy(),
                                             extra_body={"prompt_logprobs": 2}).choices[0].model_extra
    prompt_logprobs = extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    for position, entry in enumerate(prompt_logprobs[1:]):
        assert entry[str(ids[position + 1])]["logprob"] == pytest.approx(expected[position], abs=1e-4)
        assert sorted(e["rank"] for e in entry.values() if e["rank"] is not None) == [1, 2]


# --- logit_bias -------------------------------------------------------------------------------------------------
def test_logit_bias_is_applied_and_checked(server):
    biased = server.client.completions.create(prompt=PROMPT, max_tokens=6, logit_bias={"42": 100}, logprobs=0,
                                              **greedy(), extra_body={"ignore_eos": True})
    tokens = biased.choices[0].logprobs.tokens
    assert tokens == [server.tokenizer.decode([42])] * 6
    for bias in ({"100000": 1}, {"word": 1}):
        with pytest.raises(openai.BadRequestError) as error:
            server.client.completions.create(prompt=PROMPT, max_tokens=2, logit_bias=bias, **greedy())
        assert error.value.body["param"] == "logit_bias"


# --- structured outputs -----------------------------------------------------------------------------------------
def test_response_format_json_schema_validates(server):
    schema = WEATHER["function"]["parameters"]
    for seed in range(3):
        chat = server.client.chat.completions.create(
            messages=[{"role": "user", "content": "weather?"}], max_tokens=60, temperature=1.0, seed=seed, model=MODEL,
            response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
        jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    regex = server.client.completions.create(prompt=PROMPT, max_tokens=20, temperature=1.0, model=MODEL,
                                             extra_body={"structured_outputs": {"regex": "[0-9]{3}-[ab]"}})
    assert len(regex.choices[0].text) == 5 and regex.choices[0].text[3] == "-"
    choice = server.client.completions.create(prompt=PROMPT, max_tokens=20, model=MODEL,
                                              extra_body={"guided_choice": ["left", "right"]})
    assert choice.choices[0].text in ("left", "right")


BAD_STRUCTURED = [
    ({"response_format": {"type": "nonsense"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}},
     "invalid structured_outputs.json"),
    ({"guided_regex": "(unclosed"}, "invalid structured_outputs.regex"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"structured_outputs": {"grammar": "root ::= nowhere"}}, "invalid structured_outputs.grammar"),
]


@pytest.mark.parametrize("extra,named", BAD_STRUCTURED)
def test_bad_structured_outputs_are_400s_naming_the_problem(server, extra, named):
    response = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert named in (error["param"] or "") or error["message"].startswith(named), error


# --- tool calls -------------------------------------------------------------------------------------------------
def reassemble(stream) -> tuple[dict[int, dict], str | None]:
    """The streamed calls put together, checking vLLM's shape of the deltas: a call's first delta has its id,
    type and name, the later ones only fragments of its arguments. Each call counts its argument fragments."""
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                first = delta.index not in calls
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": "", "fragments": 0})
                if first:
                    assert delta.id and delta.type == "function" and delta.function.name, delta
                else:
                    assert delta.id is None and delta.function.name is None, delta
                call["id"] = delta.id or call["id"]
                call["name"] = delta.function.name or call["name"]
                call["arguments"] += delta.function.arguments or ""
                call["fragments"] += bool(delta.function.arguments)
    return calls, finish


def test_named_and_required_tool_calls_validate_and_stream(server):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    chat = server.client.chat.completions.create(messages=messages, tools=[WEATHER, CLOCK], tool_choice=named,
                                                 max_tokens=60, **greedy())
    [call] = chat.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and chat.choices[0].message.content is None
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed, _ = reassemble(server.client.chat.completions.create(
        messages=messages, tools=[WEATHER, CLOCK], tool_choice=named, max_tokens=60, stream=True, **greedy()))
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [("get_weather", call.function.arguments)]
    assert streamed[0]["id"]

    required = server.client.chat.completions.create(messages=messages, tools=[WEATHER, CLOCK],
                                                     tool_choice="required", max_tokens=120, **greedy())
    assert required.choices[0].finish_reason == "tool_calls"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for c in required.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
    streamed, finish = reassemble(server.client.chat.completions.create(
        messages=messages, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=120, stream=True, **greedy()))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
        (c.function.name, c.function.arguments) for c in required.choices[0].message.tool_calls]
    assert all(c["fragments"] >= 2 for c in streamed.values()), streamed     # arguments as they are generated
    # sampled: other calls (one or several), streamed the same way; one cut short by max_tokens is no call
    completed = 0
    for seed in range(4):
        sampled = dict(messages=messages, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=160,
                       model=MODEL, temperature=1.0, seed=seed)
        whole = server.client.chat.completions.create(**sampled).choices[0]
        streamed, finish = reassemble(server.client.chat.completions.create(**sampled, stream=True))
        assert finish == whole.finish_reason
        if whole.finish_reason == "length":
            assert whole.message.tool_calls == [] and whole.message.content
            continue
        completed += 1
        assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
            (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        for c in whole.message.tool_calls:
            jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
    assert completed, "no sampled output finished its calls within max_tokens"

    # the call and its result go back into the conversation
    followup = server.client.chat.completions.create(messages=messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}], tools=[WEATHER], max_tokens=4,
        tool_choice="none", **greedy())
    assert followup.choices[0].message.tool_calls == [] and followup.choices[0].message.content is not None


def test_auto_tool_choice_parses_hermes_calls(server):
    messages = [{"role": "user", "content": "weather in Rome?"}]
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        server.client.chat.completions.create(messages=messages, tools=[WEATHER], **greedy())
    # the model is random: a regex makes it write what a tool-calling model would
    forced = {"structured_outputs": {"regex": r'Sure\. <tool_call>\{"name": "get_weather", "arguments": '
                                              r'\{"city": "(Paris|Rome)", "days": [1-7]\}\}</tool_call>'}}
    chat = server.tools.chat.completions.create(messages=messages, tools=[WEATHER], max_tokens=150, **greedy(),
                                                extra_body=forced)
    message = chat.choices[0].message
    assert chat.choices[0].finish_reason == "tool_calls" and message.content == "Sure. "
    [call] = message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    stream = list(server.tools.chat.completions.create(messages=messages, tools=[WEATHER], max_tokens=150,
                                                       stream=True, **greedy(), extra_body=forced))
    deltas = [c.choices[0].delta for c in stream if c.choices]
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert "".join(d.content or "" for d in deltas[:first_call]) == "Sure. "       # content first, as content
    assert not any(d.content for d in deltas[first_call:])
    calls, finish = reassemble(stream)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", call.function.arguments)]
    assert calls[0]["fragments"] >= 2


# --- chat echo ---------------------------------------------------------------------------------------------------
def test_chat_echo_puts_the_continued_message_first(server):
    saying = "The quick brown fox"
    messages = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": saying}]
    continued = dict(messages=messages, max_tokens=6, **greedy())
    extra = {"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True}
    plain = server.client.chat.completions.create(**continued, extra_body=extra).choices[0].message
    echoed = server.client.chat.completions.create(**continued, extra_body={**extra, "echo": True}).choices[0]
    assert plain.content and echoed.message.content == saying + plain.content
    assert echoed.message.role == "assistant" and echoed.finish_reason == "length"
    stream = list(server.client.chat.completions.create(**continued, stream=True, extra_body={**extra, "echo": True}))
    assert stream[0].choices[0].delta.role == "assistant" and stream[1].choices[0].delta.content == saying
    assert "".join(c.choices[0].delta.content or "" for c in stream) == echoed.message.content

    # a new assistant message continues nothing: nothing to echo (the last message is the user's)
    question = [{"role": "user", "content": "Say something."}]
    fresh = dict(messages=question, max_tokens=4, extra_body={"ignore_eos": True}, **greedy())
    assert server.client.chat.completions.create(**fresh).choices[0].message.content == \
        server.client.chat.completions.create(**{**fresh, "extra_body": {"ignore_eos": True, "echo": True}}) \
        .choices[0].message.content
    # without a generation prompt the user's message is continued, under the user's role (vLLM's)
    user = server.client.chat.completions.create(messages=question, max_tokens=4, **greedy(), extra_body={
        "add_generation_prompt": False, "echo": True, "ignore_eos": True}).choices[0].message
    assert user.role == "user" and user.content.startswith("Say something.")


# --- every field applied or refused -----------------------------------------------------------------------------
REFUSED = [   # (endpoint, extra fields, param named)
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt": "\ud800"}, None),
    ("/v1/completions", {"n": 8, "max_tokens": 200}, None),          # 8 x 200 tokens can never fit 64 blocks
    ("/v1/completions", {"n": 8, "max_tokens": 200, "stream": True}, None),
    ("/v1/completions", {"allowed_token_ids": [10 ** 6]}, "allowed_token_ids"),
    ("/v1/completions", {"prompt_logprobs": 50}, "prompt_logprobs"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio"),
    ("/v1/chat/completions", {"store": True}, "store"),
    ("/v1/chat/completions", {"functions": [WEATHER["function"]]}, "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, None),
]


def test_unsupported_fields_are_refused_before_any_compute(server, caplog):
    def prompt_tokens_computed() -> int:
        return server.http.get("/stats").json()["totals"]["prompt_tokens"]

    computed = prompt_tokens_computed()
    for path, extra, param in REFUSED:
        base = {"model": MODEL, **({"prompt": "hi"} if "completions" == path[4:] else
                                   {"messages": [{"role": "user", "content": "hi"}]})}
        content = json.dumps({**base, **extra}).encode()      # json.dumps keeps "\ud800" as its escape
        response = server.http.post(path, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (extra, response.text)
        if param is not None:
            assert response.json()["error"]["param"] == param, response.json()
        assert prompt_tokens_computed() == computed, extra
    assert "n=8 samples" in server.http.post("/v1/completions", json={
        "model": MODEL, "prompt": "hi", "n": 8, "max_tokens": 200}).json()["error"]["message"]
    with caplog.at_level("WARNING", logger="pagedlab"):
        unknown = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1,
                                                            "not_a_field": 1})
    assert unknown.status_code == 200 and "not_a_field" in caplog.text      # ignored with a warning, as vLLM does


def test_extra_endpoints_headers_cached_tokens_and_metrics(server):
    tokens = server.http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert server.http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == \
        server.tokenizer.decode(tokens)
    assert server.http.post("/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
    assert server.http.get("/version").json()["version"]
    assert server.http.get("/ping").status_code == server.http.post("/ping").status_code == 200

    long_prompt = "Blocks are shared between sequences and copied on write. " * 3
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 2}
    server.http.post("/v1/completions", json=body)
    again = server.http.post("/v1/completions", json=body, headers={"X-Request-Id": "my-request-7"})
    assert again.headers["X-Request-Id"] == "my-request-7" and again.json()["id"] == "cmpl-my-request-7"
    usage = again.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == (usage["prompt_tokens"] - 1) // 16 * 16 > 0

    assert server.tools_http.post("/v1/completions", content=b"x" * (1 << 17)).status_code == 413
    metrics = server.tools_http.get("/metrics").text
    assert f'vllm:generation_tokens_total{{model_name="{MODEL}"}}' in metrics
    assert "vllm:prefix_cache_hits_total" in metrics and "pagedlab:prefix_cache_hits_total" in metrics
    assert "vllm:" not in server.http.get("/metrics").text


def stream_pieces(choice: str, text: str, size: int, parallel: bool = True) -> tuple[str, dict[int, dict], bool]:
    """text fed to a ToolStream `size` characters at a time: (content, calls as reassemble() gives them, called)."""
    from pagedlab.entrypoints.openai.tool_calls import ToolStream

    stream = ToolStream(choice, "hermes", parallel)
    messages = [stream.feed(text[i:i + size]) for i in range(0, len(text), size)]
    rest, called = stream.finish()
    messages = [m for m in messages if m is not None] + rest
    chunks = [SimpleNamespace(choices=[SimpleNamespace(finish_reason=None, delta=m)]) for m in messages]
    return "".join(m.content or "" for m in messages), reassemble(chunks)[0], called


def test_hermes_and_required_streams_reassemble_to_the_parsed_calls():
    from pagedlab.entrypoints.openai.tool_calls import parse_output

    text = ('Let me check. <tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "}\\"</tool_call"}]}}\n'
            '</tool_call>\n<tool_call>{"arguments": "{\\"q\\": 2}", "name": "b"}</tool_call><tool_call>{"name": "c"}'
            '</tool_call>')
    content, calls = parse_output("auto", text, "hermes")
    assert content == "Let me check. " and [(c.function.name, c.function.arguments) for c in calls] == [
        ("a", '{"x": [1, {"y": "}\\"</tool_call"}]}'), ("b", '{"q": 2}'), ("c", "{}")]  # arguments as written
    assert len(parse_output("auto", text, "hermes", parallel=False)[1]) == 1
    assert parse_output("auto", "no calls <tool_call>{broken", "hermes") == ("no calls <tool_call>{broken", [])
    for size in (1, 2, 5, 19, len(text)):
        streamed_content, streamed, called = stream_pieces("auto", text, size)
        assert called and streamed_content == content
        assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
            (c.function.name, c.function.arguments) for c in calls]
    assert list(stream_pieces("auto", text, 3, parallel=False)[1]) == [0]
    assert stream_pieces("auto", "no calls <tool_call>{broken", 2) == ("no calls <tool_call>{broken", {}, False)
    assert stream_pieces("auto", "text ending in <tool", 2) == ("text ending in <tool", {}, False)

    required = '[{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}, {"name":"t","parameters":{}}]'
    _, calls = parse_output("required", required, None)
    for size in (1, 4, len(required)):
        _, streamed, called = stream_pieces("required", required, size)
        assert called and [(c["name"], c["arguments"]) for c in streamed.values()] == [
            (c.function.name, c.function.arguments) for c in calls]
    assert parse_output("required", required[:40], None) == (required[:40], [])       # cut short: no call


def test_health_answers_while_a_10_mb_prompt_is_tokenized(server):
    """Tokenization runs off the event loop: /health keeps answering while a 10 MB prompt is tokenized (the prompt
    is then refused as longer than max_model_len, a 400)."""
    import statistics
    import threading
    import time

    words = ("lorem ipsum dolor sit amet consectetur " * (10_000_000 // 39 + 1))[:10_000_000]
    result = {}

    def big_request():
        with httpx.Client(base_url=server.url, timeout=300) as http:
            result["response"] = http.post("/v1/completions", json=greedy(prompt=words, max_tokens=1))

    thread = threading.Thread(target=big_request)
    thread.start()
    probes = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        http.get("/health")
        while thread.is_alive():
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            probes.append(time.perf_counter() - started)
            time.sleep(0.02)
    thread.join()
    assert result["response"].status_code == 400 and "max_model_len" in result["response"].text
    assert len(probes) >= 5, probes
    # the median is what a health checker sees; the tail allows for a loaded CI machine
    assert statistics.median(probes) < 0.1, probes
    assert statistics.quantiles(probes, n=20)[-1] < 0.25 and max(probes) < 1.0, probes
