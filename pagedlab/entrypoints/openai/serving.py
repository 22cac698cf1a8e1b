"""Completions and chat completions: an OpenAI request in, engine requests out, OpenAI responses (or SSE) back.

Each prompt of a request becomes one engine request; n samples are the engine's n (one prompt, forked
sequences). Streaming waits for the first engine output before answering, so a request the engine rejects
still gets a 4xx status rather than an error inside a 200 stream. `echo` puts the prompt's text (and, with
logprobs, its tokens' logprobs from the engine's prompt logprobs) before the completion; echo with max_tokens=0
returns the prompt alone (one token is generated and dropped). In chat, `echo` puts the last message's content
first when the answer continues it (vLLM's: with add_generation_prompt false, or a last message of the assistant).
Tool calls: tool_calls.py.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from jinja2 import TemplateError
from pydantic import BaseModel

from pagedlab.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestError
from pagedlab.entrypoints.openai import tool_calls
from pagedlab.entrypoints.openai.errors import OpenAIError, engine_error
from pagedlab.entrypoints.openai.protocol import (
    AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprob,
    ChatLogprobs, ChatStreamChoice, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
    DeltaMessage, DetokenizeRequest, DetokenizeResponse, Logprob, PromptTokensDetails, TokenizeRequest,
    TokenizeResponse, TopLogprob, UsageInfo)
from pagedlab.entrypoints.openai.request_params import reject_unsupported, sampling_params, structured_outputs
from pagedlab.outputs import CompletionOutput, RequestOutput
from pagedlab.sampling_params import SamplingParams

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


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
    def __init__(self, engine: AsyncLLMEngine, served_model_name: str, enable_auto_tool_choice: bool = False,
                 tool_call_parser: str | None = None) -> None:
        self.engine = engine
        self.model_name = served_model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.config.scheduler.max_model_len
        self.max_num_seqs = engine.config.scheduler.max_num_seqs
        self.vocab_size = engine.vocab_size
        if enable_auto_tool_choice and tool_call_parser not in tool_calls.TOOL_CALL_PARSERS:
            raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser, one of "
                             f"{', '.join(tool_calls.TOOL_CALL_PARSERS)}")
        self.auto_tool_parser = tool_call_parser if enable_auto_tool_choice else None

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

    async def _completion_prompts(self, body: CompletionRequest) -> list[dict]:
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                ids = await self.engine.run_tokenizer(self._need_tokenizer().encode, p,
                                                      add_special_tokens=body.add_special_tokens)
                entry = {"prompt": p, "prompt_token_ids": ids}
            else:
                self._check_token_ids(p, "prompt")
                entry = {"prompt_token_ids": p}
            keep = body.truncate_prompt_tokens      # vLLM's left truncation: the last `keep` tokens
            if keep is not None and len(entry["prompt_token_ids"]) > keep:
                entry = {"prompt_token_ids": entry["prompt_token_ids"][-keep:]}
            if body.echo and "prompt" not in entry:
                entry["prompt"] = await self.engine.run_tokenizer(self._decode, entry["prompt_token_ids"])
            prompts.append(entry)
        return prompts

    async def _chat_token_ids(self, body: ChatCompletionRequest) -> list[int]:
        if body.continue_final_message and body.add_generation_prompt:
            raise OpenAIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                              param="continue_final_message")
        kwargs = dict(body.chat_template_kwargs or {})
        if body.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
        if body.documents:
            kwargs["documents"] = body.documents
        return await self._apply_chat_template(
            body.messages, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, chat_template=body.chat_template, **kwargs)

    async def _apply_chat_template(self, messages, **kwargs) -> list[int]:
        """Token ids of the conversation through the chat template, in the tokenizer's thread; its errors are 400s."""
        try:
            return list(await self.engine.run_tokenizer(
                self._need_tokenizer().apply_chat_template, tool_calls.template_messages(messages), tokenize=True,
                return_dict=False, **kwargs))
        except (ValueError, TypeError, TemplateError) as exc:
            raise OpenAIError(400, f"could not apply the chat template: {exc}", param="messages") from exc

    def _check_length(self, prompts: list[dict], max_tokens: int | None) -> None:
        """prompt + max_tokens must fit max_model_len (a prompt alone too long is the engine's to reject)."""
        for prompt in prompts:
            length = len(prompt["prompt_token_ids"])
            if max_tokens is not None and length <= self.max_model_len < length + max_tokens:
                raise OpenAIError(
                    400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                         f"requested {length + max_tokens} tokens ({length} in the prompt, {max_tokens} in the "
                         "completion). Please reduce the length of the prompt or completion.", param="max_tokens")

    @staticmethod
    def request_id(raw_request: Request, body, prefix: str) -> str:
        """X-Request-Id (or the body's vLLM request_id) names the request, as in vLLM."""
        given = raw_request.headers.get("X-Request-Id") or body.request_id
        return f"{prefix}-{given or uuid.uuid4().hex}"

    def _generate(self, request_id: str, prompts: list[dict], params: SamplingParams, stream: bool
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
        return merge_outputs([self.engine.generate(p, params, f"{request_id}-{i}", stream=stream)
                              for i, p in enumerate(prompts)])

    async def _run(self, raw_request: Request, work: Awaitable[T]) -> T:
        try:
            return await cancel_on_disconnect(raw_request, work)
        except (RequestError, EngineDeadError) as exc:
            raise engine_error(exc) from exc
        except ValueError as exc:       # the engine refused the request as given (a request id in use...)
            raise OpenAIError(400, str(exc)) from exc

    @staticmethod
    async def _final_outputs(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
        async with aclosing(outputs):
            return {index: output async for index, output in outputs if output.finished}

    # --- /v1/completions ----------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, raw_request: Request
                          ) -> CompletionResponse | AsyncIterator[str]:
        self.check_model(body.model)
        reject_unsupported(body)
        if body.best_of is not None and body.best_of > 1:
            raise OpenAIError(400, "best_of > 1 is not supported (as in vLLM V1): use n", param="best_of")
        if body.max_tokens == 0 and not body.echo:
            raise OpenAIError(400, "max_tokens=0 only makes sense with echo: true (the prompt alone)",
                              param="max_tokens")
        prompts = await self._completion_prompts(body)
        echo_only = body.echo and body.max_tokens == 0
        max_tokens = 1 if echo_only else body.max_tokens
        prompt_logprobs = body.prompt_logprobs
        if body.echo and body.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, body.logprobs)
        constraint, _ = structured_outputs(body)
        params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, vocab_size=self.vocab_size,
                                 max_num_seqs=self.max_num_seqs, prompt_logprobs=prompt_logprobs,
                                 constraint=constraint)
        self._check_length(prompts, max_tokens)
        request_id = self.request_id(raw_request, body, "cmpl")
        outputs = self._generate(request_id, prompts, params, body.stream)
        if body.stream:
            first = await self._run(raw_request, anext(outputs))
            return self._completion_events(body, request_id, params, prompts, first, outputs)
        finals = await self._run(raw_request, self._final_outputs(outputs))
        choices = []
        for i in range(len(prompts)):
            for c in finals[i].outputs:
                delta = self._echoed(body, prompts[i], finals[i], Delta.whole(c))
                choices.append(self._completion_choice(i * params.n + c.index, delta, 0, body, finals[i]))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=_usage(finals.values(), generated=not echo_only))

    def _echoed(self, body: CompletionRequest, prompt: dict, output: RequestOutput, delta: Delta) -> Delta:
        """The first delta of a choice, with the prompt before it when echoing (and nothing after it with
        max_tokens=0)."""
        if body.max_tokens == 0:
            delta = Delta("", [], None if delta.logprobs is None else [], "length", None)
        if not body.echo:
            return delta
        text = prompt["prompt"]
        logprobs = None
        if delta.logprobs is not None:
            logprobs = list(output.prompt_logprobs or [None] * len(prompt["prompt_token_ids"])) + delta.logprobs
        return Delta(text + delta.text, list(prompt["prompt_token_ids"]) + delta.token_ids, logprobs,
                     delta.finish_reason, delta.stop_reason)

    def _completion_choice(self, index: int, delta: Delta, text_offset: int, body: CompletionRequest,
                           output: RequestOutput | None = None) -> CompletionChoice:
        return CompletionChoice(
            index=index, text=delta.text, finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
            logprobs=None if delta.logprobs is None else self._completion_logprobs(
                delta.token_ids, delta.logprobs, text_offset, body.return_tokens_as_token_ids),
            prompt_logprobs=self._prompt_logprobs(output, body))

    async def _completion_events(self, body: CompletionRequest, request_id: str, params: SamplingParams,
                                 prompts: list[dict], first: tuple[int, RequestOutput],
                                 outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        holdback = max(map(len, params.stop_strings), default=1) - 1
        states: dict[tuple[int, int], ChoiceState] = {}
        finals: dict[int, RequestOutput] = {}

        def chunks(index: int, output: RequestOutput) -> list[str]:
            if output.finished:
                finals[index] = output
            events = []
            for completion in output.outputs:
                is_first = (index, completion.index) not in states
                state = states.setdefault((index, completion.index), ChoiceState())
                offset = state.text_sent
                delta = state.advance(completion, holdback)
                if delta is not None:
                    if is_first:
                        delta = self._echoed(body, prompts[index], output, delta)
                    choice = self._completion_choice(index * params.n + completion.index, delta, offset, body,
                                                     output if is_first else None)
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
                                                 usage=_usage(finals.values(), generated=body.max_tokens != 0)))
            except (RequestError, EngineDeadError) as exc:
                yield sse(engine_error(exc).body)
        yield DONE

    # --- /v1/chat/completions -----------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, raw_request: Request
                   ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(body.model)
        reject_unsupported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        choice = tool_calls.tool_choice(body, self.auto_tool_parser is not None)
        constraint, source = structured_outputs(body)
        forced = tool_calls.tool_constraint(body, choice)
        if forced is not None and constraint is not None:
            raise OpenAIError(400, f"tool_choice {body.tool_choice!r} already constrains the output; it cannot be "
                                   f"combined with {source}", param=source)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(body, max_tokens=max_tokens,
                                 logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                 vocab_size=self.vocab_size, max_num_seqs=self.max_num_seqs,
                                 prompt_logprobs=body.prompt_logprobs, constraint=forced or constraint)
        prompts = [{"prompt_token_ids": await self._chat_token_ids(body)}]
        self._check_length(prompts, max_tokens)
        request_id = self.request_id(raw_request, body, "chatcmpl")
        outputs = self._generate(request_id, prompts, params, body.stream)
        role, echo = _chat_role_and_echo(body)
        if body.stream:
            first = await self._run(raw_request, anext(outputs))
            return self._chat_events(body, request_id, params, choice, role, echo, first[1], outputs)
        output = (await self._run(raw_request, self._final_outputs(outputs)))[0]
        choices = []
        for c in output.outputs:
            content, calls = tool_calls.parse_output(choice, c.text, self.auto_tool_parser, body.parallel_tool_calls)
            finish = "tool_calls" if calls and not isinstance(choice, tool_calls.NamedToolChoice) else c.finish_reason
            if echo:
                content = echo + (content or "")
            choices.append(ChatChoice(index=c.index, message=AssistantMessage(role=role, content=content,
                                                                              tool_calls=calls),
                                      logprobs=self._chat_logprobs(c.token_ids, c.logprobs, params.logprobs, body),
                                      finish_reason=finish, stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=_usage([output]),
                                      prompt_logprobs=self._prompt_logprobs(output, body))

    async def _chat_events(self, body: ChatCompletionRequest, request_id: str, params: SamplingParams, choice,
                           role: str, echo: str, first: RequestOutput,
                           outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        holdback = max(map(len, params.stop_strings), default=1) - 1
        states = [ChoiceState() for _ in range(params.n)]
        tools = [tool_calls.ToolStream(choice, self.auto_tool_parser, body.parallel_tool_calls)
                 for _ in range(params.n)]

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage))

        def chunks(output: RequestOutput) -> list[str]:
            events = []
            for completion in output.outputs:
                i = completion.index
                delta = states[i].advance(completion, holdback)
                if delta is None:
                    continue
                logprobs = self._chat_logprobs(delta.token_ids, delta.logprobs, params.logprobs, body)
                message = tools[i].feed(delta.text) if delta.text else None
                finish = delta.finish_reason
                if finish is None:
                    if message is not None or logprobs is not None:
                        events.append(chunk([ChatStreamChoice(index=i, delta=message or DeltaMessage(),
                                                              logprobs=logprobs)]))
                    continue
                rest, called = tools[i].finish()
                messages = ([message] if message is not None else []) + rest
                if called and not isinstance(choice, tool_calls.NamedToolChoice):
                    finish = "tool_calls"
                for j, m in enumerate(messages or [DeltaMessage(content="")]):
                    last = j == max(len(messages), 1) - 1
                    events.append(chunk([ChatStreamChoice(
                        index=i, delta=m, logprobs=logprobs if j == 0 else None,
                        finish_reason=finish if last else None, stop_reason=delta.stop_reason if last else None)]))
            return events

        async with aclosing(outputs):
            try:
                for index in range(params.n):
                    yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role=role, content=""))])
                for index in range(params.n if echo else 0):
                    yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(content=echo))])
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

    # --- /tokenize, /detokenize ---------------------------------------------------------------------------------
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if body.messages is not None:
            tokens = await self._apply_chat_template(body.messages, add_generation_prompt=body.add_generation_prompt)
        else:
            tokens = await self.engine.run_tokenizer(self._need_tokenizer().encode, body.prompt,
                                                     add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        self._check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=await self.engine.run_tokenizer(self._need_tokenizer().decode, body.tokens))

    # --- logprobs -----------------------------------------------------------------------------------------------
    def _decode(self, token_ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids)

    def _token_text(self, token_id: int, as_ids: bool = False) -> str:
        if as_ids or self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def _completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float] | None], text_offset: int,
                             as_ids: bool = False) -> CompletionLogprobs:
        """Entries of None (an echoed prompt's first token) have no logprob, as in OpenAI's echo."""
        result = CompletionLogprobs()
        for token_id, candidates in zip(token_ids, logprobs):
            token = self._token_text(token_id, as_ids)
            result.tokens.append(token)
            result.token_logprobs.append(None if candidates is None else candidates[token_id])
            result.top_logprobs.append(None if candidates is None else {
                self._token_text(t, as_ids): lp for t, lp in candidates.items()})
            result.text_offset.append(text_offset)
            text_offset += len(token)
        return result

    def _prompt_logprobs(self, output: RequestOutput | None, body) -> list[dict[str, Logprob] | None] | None:
        """vLLM's prompt_logprobs: per prompt token {token id: {logprob, rank, decoded_token}}; ranks are known
        for the top ones (the prompt's own token outside them has rank None)."""
        if output is None or body.prompt_logprobs is None or output.prompt_logprobs is None:
            return None
        top = body.prompt_logprobs
        result = []
        for entry in output.prompt_logprobs:
            if entry is None:
                result.append(None)
                continue
            prompt_token, outside = next(iter(entry)), len(entry) > top     # outside: not among the top ones
            ranked = [t for t, _ in sorted(entry.items(), key=lambda kv: -kv[1])
                      if not (outside and t == prompt_token)]
            rank = {t: r + 1 for r, t in enumerate(ranked)}
            result.append({str(t): Logprob(logprob=lp, rank=rank.get(t), decoded_token=self._token_text(t))
                           for t, lp in entry.items()})
        return result

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None, top: int | None,
                       body=None) -> ChatLogprobs | None:
        if logprobs is None:
            return None
        as_ids = bool(body and body.return_tokens_as_token_ids)

        def entry(token_id: int, logprob: float) -> dict:
            token = self._token_text(token_id, as_ids)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return ChatLogprobs(content=[
            ChatLogprob(**entry(token_id, candidates[token_id]), top_logprobs=[
                TopLogprob(**entry(t, lp)) for t, lp in sorted(candidates.items(), key=lambda kv: -kv[1])[:top]])
            for token_id, candidates in zip(token_ids, logprobs)])


def _chat_role_and_echo(body: ChatCompletionRequest) -> tuple[str, str]:
    """vLLM's: the answer's role is the assistant's, or with add_generation_prompt false the last message's (the
    model continues it); echo puts that last message's content first when it has that role."""
    last = body.messages[-1]
    role = "assistant" if body.add_generation_prompt else last.role
    return role, last.text() if body.echo and last.role == role else ""


def _usage(outputs, generated: bool = True) -> UsageInfo:
    """generated=False: echo with max_tokens=0, whose one generated token was dropped."""
    outputs = list(outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs) if generated else 0
    cached = sum(o.metrics.num_cached_tokens for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
