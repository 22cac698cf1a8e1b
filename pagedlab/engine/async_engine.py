"""AsyncLLMEngine: one LLMEngine shared by many asyncio callers, stepped continuously by a background thread.

Every LLMEngine call happens on that thread. Callers hand it commands (add, abort, or any function to run
between two steps); it runs the commands that arrived, takes one step, and sends each output to the asyncio
queue of the request's caller. A request that arrives while others are decoding joins the very next step
(continuous batching across clients). When nothing is left to do the thread sleeps until the next command.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from functools import partial
from typing import TypeVar

from pagedlab import events as ev
from pagedlab.engine.llm_engine import LLMEngine
from pagedlab.outputs import RequestOutput
from pagedlab.sampling_params import SamplingParams

logger = logging.getLogger("pagedlab")
T = TypeVar("T")


class RequestError(Exception):
    """A request ended with an error; the engine and every other request carry on."""


class RequestRejected(RequestError):
    """The engine refused the request as given (prompt longer than max_model_len, more blocks than the cache...)."""


class RequestFailed(RequestError):
    """The request was accepted but failed while running."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped."""


class _Stream:
    """Where the engine thread delivers one request's outputs: an asyncio queue on the caller's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()

    def put(self, item: RequestOutput | Exception) -> None:
        with contextlib.suppress(RuntimeError):     # raised when the caller's loop is closed: nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


_STOP = object()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}         # engine thread only
        self._rejected: set[str] = set()               # engine thread only: ids the scheduler rejected
        engine.bus.subscribe(self._on_event)
        self._thread = threading.Thread(target=self._run, name="pagedlab-engine", daemon=True)
        self._thread.start()

    @classmethod
    def build(cls, model: str | None = None, **kwargs) -> AsyncLLMEngine:
        from pagedlab.engine.llm import build_engine
        return cls(build_engine(model, **kwargs))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    # --- the asyncio side ---------------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int] | dict, sampling_params: SamplingParams, request_id: str,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that gave it tokens, the last one with finished=True.
        Raises RequestRejected / RequestFailed if it ends with an error. stream=False: text only on the final
        output (saves detokenizing every step). Leaving the iteration early (a client went away) aborts it."""
        stream_to = _Stream()
        self._submit(partial(self._add, prompt, sampling_params, request_id, self.engine.clock(), stream,
                             stream_to))
        finished = False
        try:
            while not finished:
                item = await stream_to.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop the request and free its blocks. Thread-safe; returns at once."""
        self._submit(partial(self._abort, request_id))

    async def run(self, fn: Callable[[LLMEngine], T]) -> T:
        """fn(engine) on the engine thread, between two steps: a consistent view of its state."""
        future: Future = Future()
        self._submit(partial(self._call, fn, future))
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        if self.is_running:
            self._commands.put(_STOP)
            self._thread.join()

    def _submit(self, command: Callable[[], None]) -> None:
        if not self.is_running:
            raise EngineDeadError("the engine thread has stopped")
        self._commands.put(command)

    # --- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            idle = not (engine.has_unfinished_requests() or engine.scheduler.rejected)
            for command in self._take_commands(block=idle):
                if command is _STOP:
                    self._fail_all(EngineDeadError, "the engine was shut down")
                    return
                try:
                    command()
                except Exception:  # noqa: BLE001 - a core bug in one command must not stop the loop
                    logger.exception("engine command failed")
            # Also step right after commands on an idle engine: it reports rejections, and its step stats
            # (what the metrics read) catch up with aborts.
            self._step()

    def _take_commands(self, block: bool) -> list:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, prompt, params: SamplingParams, request_id: str, arrival_time: float, stream: bool,
             stream_to: _Stream) -> None:
        try:
            self.engine.add_request(prompt, params, request_id, arrival_time=arrival_time, stream=stream)
        except Exception as exc:  # noqa: BLE001 - a bad request is its caller's error, not the loop's
            stream_to.put(exc)
            return
        self._streams[request_id] = stream_to

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _call(self, fn: Callable[[LLMEngine], T], future: Future) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(self.engine))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def _on_event(self, event: ev.Event) -> None:
        if event.kind == ev.REQUEST_REJECTED:
            self._rejected.add(event.data["request"].request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a core bug fails the requests in flight, not the server
            logger.exception("engine step failed; failing every request in flight")
            self._fail_all(RequestFailed, f"engine step failed: {type(exc).__name__}: {exc}")
            return
        for output in outputs:
            rejected = output.finished and output.request_id in self._rejected
            self._rejected.discard(output.request_id)
            stream = (self._streams.pop if output.finished else self._streams.get)(output.request_id, None)
            if stream is None:
                continue
            if output.error is not None:
                stream.put((RequestRejected if rejected else RequestFailed)(output.error))
            else:
                stream.put(output)

    def _fail_all(self, error: type[Exception], message: str) -> None:
        for request_id, stream in self._streams.items():
            stream.put(error(message))
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - best effort while failing
                logger.exception("could not abort %s", request_id)
        self._streams.clear()
