"""An API server's connection to the engine core: requests and aborts out, each step's outputs in, on the asyncio
loop that serves HTTP (no thread shares this process's interpreter with it).

Sending never waits (unbounded ZMQ queues). One task receives the core's per-step messages and hands them to
`on_outputs`; utility calls (stats, metrics) are answered in the same messages. The lifeline pipe becomes readable
only when the core's end closes: the core died (or was shut down), and every request in flight fails.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from pagedlab.engine.core_messages import (
    AbortRequests, AddRequest, EngineCoreOutputs, StopSequences, UtilityCall, encoder, output_decoder, pickled)
from pagedlab.engine.core_proc import CoreConnection

logger = logging.getLogger("pagedlab")


class EngineDeadError(RuntimeError):
    """The engine core has stopped."""


class CoreClient:
    def __init__(self, connection: CoreConnection, on_outputs: Callable[[EngineCoreOutputs], None],
                 on_death: Callable[[], None]) -> None:
        self.connection = connection
        self.info = connection.info
        self.client_index = connection.client_index
        self._on_outputs, self._on_death = on_outputs, on_death
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._encoder = encoder()
        self.dead = False
        self.closed = False

    @property
    def is_running(self) -> bool:
        return not (self.dead or self.closed or self.connection.lifeline.poll())

    def start(self) -> None:
        """Connect on the running loop (done by the first request; the lifespan of an app does it at startup)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            raise RuntimeError("this engine client already serves another event loop")
        self._loop = loop
        self._context = zmq.asyncio.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.connect(self.connection.input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.connect(self.connection.output_address)
        self._receiver = loop.create_task(self._receive(), name="pagedlab-core-outputs")
        loop.add_reader(self.connection.lifeline.fileno(), self._core_died)

    def add(self, message: AddRequest) -> None:
        self._send(message)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.is_running and self._loop is not None:
            self._send(AbortRequests(request_ids))

    def stop(self, request_id: str, stops: list[tuple[int, str]]) -> None:
        """Finish the request's sequences (index, stop string) that a stop string ended here."""
        if self.is_running and self._loop is not None:
            self._send(StopSequences(request_id, [i for i, _ in stops], [s for _, s in stops]))

    async def call(self, method: str, *args: Any) -> Any:
        """method(*args) on the core, between two of its steps."""
        self.start()
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._calls[call_id] = future
        self._send(UtilityCall(self.client_index, call_id, method, pickled(args) if args else b""))
        return await future

    def _send(self, message) -> None:
        if not self.is_running:
            raise EngineDeadError("the engine core has stopped")
        self.start()
        self._input.send(self._encoder.encode(message), zmq.NOBLOCK, copy=False)

    async def _receive(self) -> None:
        decoder = output_decoder()
        while True:
            frame = await self._output.recv(copy=False)
            try:
                message = decoder.decode(frame.buffer)
                self._on_outputs(message)
                for result in message.utility_results:
                    future = self._calls.pop(result.call_id, None)
                    if future is None or future.done():
                        continue
                    if result.error is not None:
                        future.set_exception(RuntimeError(result.error))
                    else:
                        future.set_result(pickle.loads(result.result))
            except Exception:  # noqa: BLE001 - one bad message must not stop the API server
                logger.exception("could not handle the engine core's outputs")

    def _core_died(self) -> None:
        self._loop.remove_reader(self.connection.lifeline.fileno())
        if self.closed:
            return
        self.dead = True
        logger.error("the engine core has stopped: failing every request in flight")
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError("the engine core has stopped"))
        self._calls.clear()
        self._on_death()

    def close(self) -> None:
        """Disconnect (on the loop it serves, or after that loop is gone)."""
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            if not self._loop.is_closed():
                try:
                    self._loop.remove_reader(self.connection.lifeline.fileno())
                except (RuntimeError, ValueError, OSError):
                    pass
                self._receiver.cancel()
            self._input.close(linger=0)
            self._output.close(linger=0)
            self._context.term()
        self.connection.lifeline.close()
