"""AsyncLLMEngine: what an API server calls. Requests go to the engine core process (core_proc.py); each step's
token ids come back in one message and become RequestOutputs here, decoded incrementally, stop strings found
(output_processor.py); a stop string found here finishes its sequence in the core (CoreClient.stop).

`AsyncLLMEngine.build(model, **engine_args)` starts a core for this process alone; `pagedlab serve
--api-server-count N` starts one core and N API server processes, each with `AsyncLLMEngine(connection)`.
Everything the asyncio side does runs on the loop that first uses the engine (the server's).
"""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pagedlab.engine.core_client import CoreClient, EngineDeadError
from pagedlab.engine.core_messages import AddRequest, EngineCoreOutputs
from pagedlab.engine.core_proc import CoreConnection, CoreProcess
from pagedlab.engine.llm_engine import NO_TOKENIZER, parse_prompt
from pagedlab.engine.output_processor import RequestState
from pagedlab.outputs import RequestOutput
from pagedlab.sampling_params import SamplingParams

__all__ = ["AsyncLLMEngine", "EngineDeadError", "RequestError", "RequestFailed", "RequestRejected"]
T = TypeVar("T")


class RequestError(Exception):
    """A request ended with an error; the engine and every other request carry on."""


class RequestRejected(RequestError):
    """The engine refused the request as given (prompt longer than max_model_len, more blocks than the cache...)."""


class RequestFailed(RequestError):
    """The request was accepted but failed while running."""


class AsyncLLMEngine:
    def __init__(self, connection: CoreConnection, core: CoreProcess | None = None, tokenizer="auto") -> None:
        """An API server's engine over `connection`; `core`, if given, is stopped by shutdown(). The tokenizer is
        the model's unless given (an API server loads it while the core loads the model)."""
        from pagedlab.engine.llm import load_tokenizer

        self.core = core
        self.client = CoreClient(connection, self._on_outputs, self._on_death)
        info = connection.info
        self.config = info.config
        self.vocab_size = info.vocab_size
        self.kv_budget = info.kv_budget
        self.core_pid = info.pid
        self.tokenizer = load_tokenizer(self.config.model.tokenizer or self.config.model.model) \
            if tokenizer == "auto" else tokenizer
        self._requests: dict[str, RequestState] = {}
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedlab-tokenizer")

    @classmethod
    def build(cls, model: str | None = None, **kwargs) -> AsyncLLMEngine:
        """Start an engine core (its own process) with LLM's arguments and connect to it."""
        core = CoreProcess(model, 1, **kwargs)
        try:
            return cls(core.connection(0), core)
        except BaseException:
            core.shutdown()
            raise

    @property
    def is_running(self) -> bool:
        return self.client.is_running

    # --- requests -----------------------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int] | dict, sampling_params: SamplingParams, request_id: str,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that gave it tokens, the last one with finished=True.
        Raises RequestRejected / RequestFailed if it ends with an error, EngineDeadError if the core stops.
        stream=False: only the final output. Leaving the iteration early (a client went away) aborts it."""
        arrival_time = time.monotonic()
        if sampling_params.stop_strings and self.tokenizer is None:
            raise RequestRejected("stop strings need a tokenizer, and this engine has none; use stop_token_ids")
        text, token_ids = await self._prompt(prompt)
        state = RequestState(request_id, text, token_ids, sampling_params, self.tokenizer, arrival_time)
        if request_id in self._requests:
            raise RequestRejected(f"request id {request_id!r} is already running")
        # Stop strings are found here, so the core reports their every step even when only the end is wanted.
        self.client.add(AddRequest.make(request_id, token_ids, sampling_params, arrival_time,
                                        self.client.client_index, stream or bool(sampling_params.stop_strings)))
        self._requests[request_id] = state
        finished = False
        try:
            while not finished:
                item = await state.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise (RequestRejected if state.rejected else RequestFailed)(item.error)
                if stream or finished:
                    yield item
        finally:
            if self._requests.pop(request_id, None) is not None and not finished:
                self.client.abort([request_id])

    async def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        text, ids = parse_prompt(prompt)
        if ids is not None:
            return text, ids
        if self.tokenizer is None:
            raise RequestRejected(NO_TOKENIZER)
        return text, await self.run_tokenizer(self.tokenizer.encode, text)

    async def run_tokenizer(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) (tokenizing, chat templating) in the tokenizer's worker thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizer_pool, functools.partial(fn, *args, **kwargs))

    def abort(self, request_id: str) -> None:
        """Stop the request and free its blocks; returns at once."""
        if self._requests.pop(request_id, None) is not None:
            self.client.abort([request_id])

    def _on_outputs(self, message: EngineCoreOutputs) -> None:
        requests = self._requests
        for output in message.outputs:
            state = requests.get(output.request_id)
            if state is None:
                continue
            result = state.update(output)
            if state.stops:
                if not output.finished:
                    self.client.stop(output.request_id, state.stops)
                state.stops = []
            state.queue.put_nowait(result)

    def _on_death(self) -> None:
        for state in self._requests.values():
            state.queue.put_nowait(EngineDeadError("the engine core has stopped"))

    # --- the core's statistics ------------------------------------------------------------------------------
    async def stats(self) -> dict:
        """The KV memory picture, queues, totals and last step (metrics.engine_stats), from the core."""
        return await self.client.call("stats")

    async def steps(self, since: int = 0) -> list[dict]:
        """The recent steps' StepStats (as dicts) after step `since`, from the core."""
        return await self.client.call("steps", since)

    async def metrics(self) -> bytes:
        """The core's Prometheus exposition."""
        return await self.client.call("metrics")

    def shutdown(self) -> None:
        self.client.close()
        self._tokenizer_pool.shutdown(wait=False)
        if self.core is not None:
            self.core.shutdown()
