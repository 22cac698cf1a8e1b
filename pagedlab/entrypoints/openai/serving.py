"""Completions and chat completions: an OpenAI request in, engine requests out, OpenAI responses (or SSE) back.

Each prompt of a request becomes one engine request; n samples are the engine's n (one prompt, forked
sequences). Streaming waits for the first engine output before answering, so a request the engine rejects
still gets a 4xx status rather than an error inside a 200 stream.
"""
from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from jinja2 import TemplateError
from pydantic import BaseModel

from pagedlab.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestError, RequestRejected
from pagedlab.entrypoints.openai.protocol import (
    AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprob,
    ChatLogprobs, ChatMessage, ChatStreamChoice, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DeltaMessage, ErrorInfo, ErrorResponse, SamplingRequest, TokenizeRequest, TokenizeResponse,
    TopLogprob, UsageInfo)
from pagedlab.outputs import CompletionOutput, RequestOutput
from pagedlab.sampling_params import SamplingParams

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


class OpenAIError(Exception):
    """An error the client gets as OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(
            message=message, type="invalid_request_error" if status < 500 else "server_error", param=param,
            code=code))


def engine_error(exc: RequestError | EngineDeadError) -> OpenAIError:
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, str(exc))
    return OpenAIError(400, str(exc)) if isinstance(exc, RequestRejected) else OpenAIError(500, str(exc))


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def merge_outputs(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Several requests' outputs as they come, each tagged with its request's index. The first error ends it
    and, like leaving early, cancels (so aborts) the others."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream):
                async for output in stream:
                    queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def cancel_on_disconnect(raw_request: Request, work: Awaitable[T]) -> T:
    """Await work unless the client goes away first; then cancel it (which aborts its engine requests)."""
    async def disconnected() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()           # a no-op once it is done
    if task not in done:
        raise OpenAIError(499, "the client closed the request")
    return task.result()


def stable_length(text: str, holdback: int) -> int:
    """How much of an unfinished sequence's text cannot change any more: not a trailing incomplete UTF-8
    character (decoded as U+FFFD), nor the last `holdback` characters, which could start a stop string."""
    return max(0, min(len(text.rstrip("\ufffd")), len(text) - holdback))


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None

    @classmethod
    def whole(cls, completion: CompletionOutput) -> Delta:
        return cls(completion.text, completion.token_ids, completion.logprobs, completion.finish_reason,
                   completion.stop_reason)


@dataclass
class ChoiceState:
    """What one choice of a stream has sent so far."""
    text_sent: int = 0
    tokens_sent: int = 0
    finished: bool = False

    def advance(self, completion: CompletionOutput, holdback: int) -> Delta | None:
        """The new text and tokens since the last delta (the text may be empty: a token that ends no character, or
        text held back); None when nothing new came."""
        if self.finished:
            return None
        self.finished = completion.finish_reason is not None
        end = len(completion.text) if self.finished else max(self.text_sent,
                                                             stable_length(completion.text, holdback))
        if end == self.text_sent and len(completion.token_ids) == self.tokens_sent and not self.finished:
            return None
        text = completion.text[self.text_sent:end]
        tokens = completion.token_ids[self.tokens_sent:]
        logprobs = None if completion.logprobs is None else completion.logprobs[self.tokens_sent:]
        self.text_sent, self.tokens_sent = end, len(completion.token_ids)
        return Delta(text, tokens, logprobs, completion.finish_reason, completion.stop_reason)


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_name: str) -> None:
        self.engine = engine
        self.model_name = served_model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.config.scheduler.max_model_len
        self.max_num_seqs = engine.config.scheduler.max_num_seqs
        self.vocab_size = engine.vocab_size

    # --- requests -> engine inputs ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                              param="model", code="model_not_found")

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise OpenAIError(400, "this model has no tokenizer: send token ids as the prompt", param="prompt")
        return self.tokenizer

    def _check_token_ids(self, token_ids: list[int], param: str) -> None:
        # Out-of-range ids would fail the whole batch inside the model, so they stop here.
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise OpenAIError(400, f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}", param=param)

    async def _completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[dict]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                prompts.append({"prompt": p, "prompt_token_ids": await self.engine.run_tokenizer(
                    self._need_tokenizer().encode, p)})
            else:
                self._check_token_ids(p, "prompt")
                prompts.append({"prompt_token_ids": p})
        return prompts

    async def _chat_token_ids(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            return list(await self.engine.run_tokenizer(
                self._need_tokenizer().apply_chat_template, conversation,
                add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False))
        except (ValueError, TemplateError) as exc:
            raise OpenAIError(400, f"could not apply the chat template: {exc}", param="messages") from exc

    def _sampling_params(self, body: SamplingRequest, max_tokens: int | None, logprobs: int | None
                         ) -> SamplingParams:
        if body.n > self.max_num_seqs:
            raise OpenAIError(400, f"n ({body.n}) is larger than max_num_seqs ({self.max_num_seqs}): its samples "
                                   "could never run together", param="n")
        if body.stop_token_ids:
            self._check_token_ids(body.stop_token_ids, "stop_token_ids")

        def given(value, default):
            return default if value is None else value
        try:
            return SamplingParams(
                n=body.n, temperature=given(body.temperature, 1.0), top_p=given(body.top_p, 1.0),
                top_k=given(body.top_k, 0), min_p=given(body.min_p, 0.0), seed=body.seed, stop=body.stop,
                stop_token_ids=body.stop_token_ids, max_tokens=max_tokens, min_tokens=body.min_tokens,
                ignore_eos=body.ignore_eos, logprobs=logprobs, presence_penalty=given(body.presence_penalty, 0.0),
                frequency_penalty=given(body.frequency_penalty, 0.0),
                repetition_penalty=given(body.repetition_penalty, 1.0),
                include_stop_str_in_output=body.include_stop_str_in_output,
                skip_special_tokens=body.skip_special_tokens)
        except ValueError as exc:
            field = re.match(r"SamplingParams\.(\w+)", str(exc))
            raise OpenAIError(400, str(exc), param=field and field.group(1)) from exc

    def _check_length(self, prompts: list[dict], max_tokens: int | None) -> None:
        """prompt + max_tokens must fit max_model_len (a prompt alone too long is the engine's to reject)."""
        for prompt in prompts:
            length = len(prompt["prompt_token_ids"])
            if max_tokens is not None and length <= self.max_model_len < length + max_tokens:
                raise OpenAIError(
                    400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                         f"requested {length + max_tokens} tokens ({length} in the prompt, {max_tokens} in the "
                         "completion). Please reduce the length of the prompt or completion.", param="max_tokens")

    def _generate(self, request_id: str, prompts: list[dict], params: SamplingParams, stream: bool
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
        return merge_outputs([self.engine.generate(p, params, f"{request_id}-{i}", stream=stream)
                              for i, p in enumerate(prompts)])

    async def _run(self, raw_request: Request, work: Awaitable[T]) -> T:
        try:
            return await cancel_on_disconnect(raw_request, work)
        except (RequestError, EngineDeadError) as exc:
            raise engine_error(exc) from exc

    @staticmethod
    async def _final_outputs(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
        async with aclosing(outputs):
            return {index: output async for index, output in outputs if output.finished}

    # --- /v1/completions ----------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, raw_request: Request
                          ) -> CompletionResponse | AsyncIterator[str]:
        self.check_model(body.model)
        prompts = await self._completion_prompts(body.prompt)
        params = self._sampling_params(body, body.max_tokens, body.logprobs)
        self._check_length(prompts, body.max_tokens)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = self._generate(request_id, prompts, params, body.stream)
        if body.stream:
            first = await self._run(raw_request, anext(outputs))
            return self._completion_events(body, request_id, params, first, outputs)
        finals = await self._run(raw_request, self._final_outputs(outputs))
        choices = [self._completion_choice(i * params.n + c.index, Delta.whole(c), 0)
                   for i in range(len(prompts)) for c in finals[i].outputs]
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=_usage(finals.values()))

    def _completion_choice(self, index: int, delta: Delta, text_offset: int) -> CompletionChoice:
        return CompletionChoice(index=index, text=delta.text, finish_reason=delta.finish_reason,
                                stop_reason=delta.stop_reason,
                                logprobs=None if delta.logprobs is None else self._completion_logprobs(
                                    delta.token_ids, delta.logprobs, text_offset))

    async def _completion_events(self, body: CompletionRequest, request_id: str, params: SamplingParams,
                                 first: tuple[int, RequestOutput], outputs: AsyncIterator[tuple[int, RequestOutput]]
                                 ) -> AsyncIterator[str]:
        holdback = max(map(len, params.stop_strings), default=1) - 1
        states: dict[tuple[int, int], ChoiceState] = {}
        finals: dict[int, RequestOutput] = {}

        def chunks(index: int, output: RequestOutput) -> list[str]:
            if output.finished:
                finals[index] = output
            events = []
            for completion in output.outputs:
                state = states.setdefault((index, completion.index), ChoiceState())
                offset = state.text_sent
                delta = state.advance(completion, holdback)
                if delta is not None:
                    choice = self._completion_choice(index * params.n + completion.index, delta, offset)
                    events.append(sse(CompletionResponse(id=request_id, model=self.model_name, choices=[choice])))
            return events

        async with aclosing(outputs):
            try:
                for event in chunks(*first):
                    yield event
                async for index, output in outputs:
                    for event in chunks(index, output):
                        yield event
                if body.stream_options and body.stream_options.include_usage:
                    yield sse(CompletionResponse(id=request_id, model=self.model_name, choices=[],
                                                 usage=_usage(finals.values())))
            except (RequestError, EngineDeadError) as exc:
                yield sse(engine_error(exc).body)
        yield DONE

    # --- /v1/chat/completions -----------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, raw_request: Request
                   ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self._sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        prompts = [{"prompt_token_ids": await self._chat_token_ids(body.messages, body.add_generation_prompt)}]
        self._check_length(prompts, max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = self._generate(request_id, prompts, params, body.stream)
        if body.stream:
            first = await self._run(raw_request, anext(outputs))
            return self._chat_events(body, request_id, params, first[1], outputs)
        output = (await self._run(raw_request, self._final_outputs(outputs)))[0]
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                              logprobs=self._chat_logprobs(c.token_ids, c.logprobs, params.logprobs),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in output.outputs]
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=_usage([output]))

    async def _chat_events(self, body: ChatCompletionRequest, request_id: str, params: SamplingParams,
                           first: RequestOutput, outputs: AsyncIterator[tuple[int, RequestOutput]]
                           ) -> AsyncIterator[str]:
        holdback = max(map(len, params.stop_strings), default=1) - 1
        states = [ChoiceState() for _ in range(params.n)]

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage))

        def chunks(output: RequestOutput) -> list[str]:
            events = []
            for completion in output.outputs:
                delta = states[completion.index].advance(completion, holdback)
                if delta is not None:
                    events.append(chunk([ChatStreamChoice(
                        index=completion.index, delta=DeltaMessage(content=delta.text),
                        logprobs=self._chat_logprobs(delta.token_ids, delta.logprobs, params.logprobs),
                        finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)]))
            return events

        async with aclosing(outputs):
            try:
                for index in range(params.n):
                    yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
                output = first
                for event in chunks(output):
                    yield event
                async for _, output in outputs:
                    for event in chunks(output):
                        yield event
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk([], _usage([output]))
            except (RequestError, EngineDeadError) as exc:
                yield sse(engine_error(exc).body)
        yield DONE

    # --- /tokenize ----------------------------------------------------------------------------------------------
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if body.messages is not None:
            tokens = await self._chat_token_ids(body.messages, body.add_generation_prompt)
        else:
            tokens = await self.engine.run_tokenizer(self._need_tokenizer().encode, body.prompt,
                                                     add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens)

    # --- logprobs -----------------------------------------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], text_offset: int
                             ) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for token_id, candidates in zip(token_ids, logprobs):
            token = self._token_text(token_id)
            result.tokens.append(token)
            result.token_logprobs.append(candidates[token_id])
            result.top_logprobs.append({self._token_text(t): lp for t, lp in candidates.items()})
            result.text_offset.append(text_offset)
            text_offset += len(token)
        return result

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None, top: int | None
                       ) -> ChatLogprobs | None:
        if logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            token = self._token_text(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return ChatLogprobs(content=[
            ChatLogprob(**entry(token_id, candidates[token_id]), top_logprobs=[
                TopLogprob(**entry(t, lp)) for t, lp in sorted(candidates.items(), key=lambda kv: -kv[1])[:top]])
            for token_id, candidates in zip(token_ids, logprobs)])


def _usage(outputs) -> UsageInfo:
    outputs = list(outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
