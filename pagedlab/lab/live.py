"""The real engine, live: it steps in an engine-core process of its own (lab/live_core.py) on a steady stream of
requests, and every step's statistics arrive here as messages. A learner's own message joins the same batch: its
block table and text come with every step, so a view can show its blocks filling while the model answers.

This process only sends calls and reads reports: one receiver thread, which blocks in ZMQ (GIL released) between
messages, turns them into rows. Nothing here competes with the engine for an interpreter.
"""
from __future__ import annotations

import atexit
import bisect
import itertools
import pickle
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import pandas as pd
import zmq

from pagedlab.engine.core_messages import UtilityCall, encoder, output_decoder, pickled
from pagedlab.engine.core_proc import CoreProcess
from pagedlab.lab.live_core import run_live_core
from pagedlab.lab.models import lab_model

CALL_TIMEOUT_S = 600            # building an engine: loading the model, profiling the card's memory


class EngineCoreDied(RuntimeError):
    """The live engine's core process has stopped."""


@dataclass
class ChatTurn:
    """A learner's message and the engine's answer so far, with the answer's blocks after the last step."""
    message: str
    request_id: str = ""
    max_tokens: int = 96
    prompt_tokens: int = 0
    block_size: int = 0
    answer: str = ""
    status: str = "waiting"
    blocks: list[tuple[int, int]] = field(default_factory=list)    # (physical block id, slots filled)
    error: str | None = None


class LiveEngine:
    """Runs `build_engine(model, **engine_kwargs)` in a core process, keeping `backlog` requests waiting so it is
    always busy. `rows` gets one dict per step (StepStats + memory accounting + wall seconds); `marks` one
    (seconds, label) per (re)start. Both survive restarts, so before and after a change can be compared.
    `info` holds the running engine's figures (blocks, their size, the device). The core process is spawned: a
    script (not a notebook) that starts one needs an `if __name__ == "__main__":` guard."""

    def __init__(self, model: str | None = None, workload: str = "sharegpt", backlog: int = 64) -> None:
        self.model = model or lab_model()
        self.workload = workload
        self.backlog = backlog
        self.rows: list[dict] = []
        self.marks: list[tuple[float, str]] = []
        self.chats: list[ChatTurn] = []
        self.info: dict | None = None
        self.error: str | None = None
        self.finished = False           # the last run ran its time out
        self._origin = time.monotonic()
        self._core: CoreProcess | None = None
        self._calls: dict[int, tuple[Future, object]] = {}
        self._call_ids = itertools.count()
        self._send_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._turns: dict[str, ChatTurn] = {}
        self._frame, self._framed = pd.DataFrame(), 0

    def seconds(self) -> float:
        return time.monotonic() - self._origin

    @property
    def running(self) -> bool:
        return not self._idle.is_set()

    @property
    def pid(self) -> int | None:
        """The core process's id (None before the first start)."""
        return None if self._core is None else self._core.pid

    def start(self, run_seconds: float = 60.0, label: str = "", **engine_kwargs) -> None:
        """Stop the current run, rebuild the engine with `engine_kwargs`, run it for `run_seconds`.
        Raises ConfigError (with the engine's message) when the settings cannot work."""
        self._connect()

        def started(info) -> None:        # on the receiver thread, before any step of the new run arrives
            if isinstance(info, Exception):
                return
            self.info, self.error, self.finished = info, None, False
            self.marks.append((self.seconds(), label or f"block {info['block_size']}, {info['num_blocks']} blocks"))
            self._idle.clear()
        result = self._call("start_run", (engine_kwargs, run_seconds, self.workload, self.backlog), started)
        if isinstance(result, Exception):
            self.info = None            # the core has no engine now
            raise result

    def send(self, message: str, max_tokens: int = 96) -> ChatTurn:
        """Queue a chat message for the running engine; its answer and blocks fill in the returned turn."""
        turn = ChatTurn(message, max_tokens=max_tokens)
        self.chats.append(turn)

        def queued(request_id) -> None:
            if isinstance(request_id, str):
                turn.request_id = request_id
                self._turns[request_id] = turn
        try:
            self._call("chat", (message, max_tokens), queued)
        except RuntimeError as exc:
            turn.status, turn.error = "not sent", str(exc)
        return turn

    def stop(self) -> None:
        if self._core is not None and self.running:
            self._call("stop_run", ())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end (its time out, a stop, an error); False if `timeout` came first."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Stop the core process and the receiver thread for good (a later start begins a new process)."""
        core, self._core = self._core, None
        if core is None:
            return
        atexit.unregister(core.shutdown)
        self._closing.set()
        self._receiver.join()
        core.shutdown()
        self._input.close(linger=0)
        self._context.term()
        self._idle.set()

    def engine_memory(self) -> dict | None:
        """The engine's own memory figures for the GPU panel: its blocks, their size, how many are taken now."""
        if self.info is None:
            return None
        taken = self.rows[-1]["kv_blocks_used"] if self.rows and self.rows[-1]["run"] == len(self.marks) - 1 else 0
        return {**self.info, "blocks_taken": int(taken)}

    def frame(self, last_seconds: float | None = None) -> pd.DataFrame:
        """The rows so far (or of the last `last_seconds`) as a DataFrame. Only rows new since the last call are
        converted, so a long run's frame costs its new steps, not its history."""
        count = len(self.rows)
        if count > self._framed:
            new = pd.DataFrame(self.rows[self._framed:count])
            self._frame = new if not len(self._frame) else pd.concat([self._frame, new], ignore_index=True)
            self._framed = count
        frame = self._frame
        if last_seconds is not None and len(frame):
            walls = frame["wall"].to_numpy()
            frame = frame.iloc[bisect.bisect_left(walls, walls[-1] - last_seconds):]
        return frame

    # --- the core process and its messages ---------------------------------------------------------------------
    def _connect(self) -> None:
        if self._core is not None and self._core.process.is_alive():
            return
        if self._core is not None:
            self.close()
        core = CoreProcess(self.model, target=run_live_core)
        atexit.register(core.shutdown)       # before multiprocessing's exit hook, which would wait for it forever
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.connect(core.input_address)
        output = self._context.socket(zmq.PULL)
        output.setsockopt(zmq.RCVHWM, 0)
        output.connect(core.output_addresses[0])
        self._core, self._encoder = core, encoder()
        self._closing = threading.Event()
        self._receiver = threading.Thread(target=self._receive, args=(output, core.process.sentinel), daemon=True,
                                          name="pagedlab-live-receiver")
        self._receiver.start()

    def _call(self, method: str, args: tuple, on_result=None):
        """method(*args) in the core, between two of its steps; waits for the answer. `on_result(answer)` runs
        on the receiver thread first, in order with the step reports."""
        call_id, future = next(self._call_ids), Future()
        self._calls[call_id] = (future, on_result)
        with self._send_lock:
            self._input.send(self._encoder.encode(UtilityCall(0, call_id, method, pickled(args))), copy=False)
        return future.result(CALL_TIMEOUT_S)

    def _receive(self, output, sentinel: int) -> None:
        decoder, poller = output_decoder(), zmq.Poller()
        poller.register(output, zmq.POLLIN)
        poller.register(sentinel, zmq.POLLIN)       # readable once the core process has exited
        try:
            while not self._closing.is_set():
                events = dict(poller.poll(200))
                if output in events:
                    while True:
                        try:
                            frame = output.recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(decoder.decode(frame.buffer))
                elif events:
                    break
        finally:
            output.close(linger=0)
            if self._core is not None and not self._idle.is_set():
                self.error = "the engine core process stopped"
            self._idle.set()
            for future, _ in self._calls.values():
                future.set_exception(EngineCoreDied("the engine core process stopped"))
            self._calls.clear()

    def _handle(self, message) -> None:
        for report in message.steps:
            if report.stats:
                self.rows.append({**report.stats, "wall": report.time - self._origin, "run": len(self.marks) - 1,
                                  **{f"mem_{k}": v for k, v in report.memory.items()}})
            for followed in report.followed:
                turn = self._turns.get(followed.request_id)
                if turn is not None:
                    turn.status, turn.answer, turn.error = followed.status, followed.text, followed.error
                    turn.prompt_tokens, turn.block_size = followed.prompt_tokens, followed.block_size
                    if followed.blocks:        # a finished request's blocks are freed: keep its last table
                        turn.blocks = [tuple(block) for block in followed.blocks]
            if report.ended is not None:
                self.finished = report.ended == "time"
                if report.ended not in ("time", "stopped", "restarted"):
                    self.error = report.ended
                self._idle.set()
        for result in message.utility_results:
            future, on_result = self._calls.pop(result.call_id, (None, None))
            if future is None:
                continue
            if result.error is not None:
                future.set_exception(RuntimeError(result.error))
                continue
            answer = pickle.loads(result.result)
            if on_result is not None:
                on_result(answer)
            future.set_result(answer)
