"""The engine core in its own process, as in vLLM V1: a busy loop of schedule, execute and update, fed by the API
servers over ZMQ, so that no HTTP or tokenizer work shares its interpreter.

Each step the loop takes whatever requests, aborts and utility calls arrived (blocking only when it has nothing to
run), steps the LLMEngine once, and sends each API server one EngineCoreOutputs message with its requests' new tokens
and finish states (core_messages.py). It runs the same LLMEngine as the offline `LLM` but never touches text: the
API servers decode it and find stop strings (output_processor.py), and send StopSequences to finish a sequence. Under
tensor parallelism it is rank 0 and spawns the other ranks itself.

Lifetime: each API server holds one end of a pipe whose other end the core watches, so the core sees an API server
go (its pipe closes) and the API server sees the core die (its pipe closes the other way). The core ignores SIGINT
and SIGTERM: it stops when the API servers do, after they drained.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import tempfile
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any

import zmq

from pagedlab import events as ev
from pagedlab.engine.core_messages import (
    AbortRequests, AddRequest, CompletionDelta, EngineCoreOutput, EngineCoreOutputs, StopSequences, UtilityCall,
    UtilityResult, encoder, input_decoder, pickled)
from pagedlab.engine.llm_engine import LLMEngine
from pagedlab.outputs import RequestMetrics
from pagedlab.sequence import Request

logger = logging.getLogger("pagedlab")
STARTUP_TIMEOUT_S = 600         # loading and profiling a large model, capturing its CUDA graphs
SHUTDOWN_TIMEOUT_S = 30
RECENT_STEPS = 4096             # steps with work kept for /stats/steps


@dataclass
class CoreInfo:
    """What an API server needs to know of the engine it talks to, sent once the engine is built."""
    config: Any                         # EngineConfig
    vocab_size: int | None
    eos_token_ids: tuple[int, ...]
    kv_budget: dict = field(default_factory=dict)
    pid: int = 0


@dataclass
class CoreConnection:
    """One API server's way to its core: the addresses and its end of the lifetime pipe (picklable to a spawned
    API server); info is None until the core is ready."""
    info: CoreInfo | None
    input_address: str
    output_address: str
    client_index: int
    lifeline: connection.Connection


# --- the core process --------------------------------------------------------------------------------------------
class EngineCore:
    UTILITIES = ("stats", "steps", "metrics")

    def __init__(self, engine: LLMEngine, input_address: str, output_addresses: list[str],
                 lifelines: list[connection.Connection]) -> None:
        self._bind(engine)
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PULL)
        self._input.setsockopt(zmq.RCVHWM, 0)
        self._input.bind(input_address)
        self._outputs = []
        for address in output_addresses:
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, 0)
            socket.bind(address)
            self._outputs.append(socket)
        self._lifelines = dict(enumerate(lifelines))
        self._poller = zmq.Poller()
        self._poller.register(self._input, zmq.POLLIN)
        for lifeline in lifelines:
            self._poller.register(lifeline.fileno(), zmq.POLLIN)
        self._encoder, self._decoder = encoder(), input_decoder()
        self._results: dict[int, list[UtilityResult]] = {}

    def _bind(self, engine: LLMEngine) -> None:
        """Serve `engine`: its metrics, its events and the per-request bookkeeping start afresh."""
        from prometheus_client import CollectorRegistry

        from pagedlab.entrypoints.openai.metrics import EngineMetrics

        self.engine = engine
        engine.output_processor.detokenize = False     # the API servers' front ends decode, stop strings included
        self.registry = CollectorRegistry()
        EngineMetrics(engine, self.registry)
        self._rejected: set[str] = set()
        self._owner: dict[str, int] = {}          # request id -> the API server that sent it
        self._streaming: set[str] = set()         # ids whose every step is reported (others: only their end)
        self._sent: dict[str, list[int]] = {}     # request id -> output tokens already sent, per sequence
        self.recent_steps: deque = deque(maxlen=RECENT_STEPS)
        engine.bus.subscribe(self._on_event, {ev.REQUEST_REJECTED, ev.STEP})

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        engine = self.engine
        while self._lifelines:
            idle = not (engine.has_unfinished_requests() or engine.scheduler.rejected)
            if not self._take_inputs(block=idle):
                continue
            self._step()

    def _take_inputs(self, block: bool) -> bool:
        """Handle what arrived (waiting for something when idle); False if only an API server went away."""
        events = dict(self._poller.poll(None if block else 0))
        for index, lifeline in list(self._lifelines.items()):
            if lifeline.fileno() in events:
                self._client_gone(index)
        if self._input not in events:
            return not block
        while True:
            try:
                message = self._decoder.decode(self._input.recv(zmq.NOBLOCK, copy=False).buffer)
            except zmq.Again:
                break
            try:
                self._handle(message)
            except Exception:  # noqa: BLE001 - a bad message must not stop the loop
                logger.exception("engine core: could not handle %s", type(message).__name__)
        if self._results:
            self._send({}, self._results)
        return True

    def _handle(self, message) -> None:
        if isinstance(message, AddRequest):
            self._add(message)
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                self._forget(request_id)
                self.engine.abort_request(request_id)
        elif isinstance(message, StopSequences):
            if self.engine.stop_sequences(message.request_id, dict(zip(message.indexes, message.stop_reasons))):
                self._forget(message.request_id)        # its front end has reported it already
        elif isinstance(message, UtilityCall):
            self._call(message)

    def _add(self, message: AddRequest) -> None:
        request_id = message.request_id
        self._owner[request_id] = message.client_index
        if message.stream:
            self._streaming.add(request_id)
        try:
            self.engine.add_request({"prompt_token_ids": message.prompt_token_ids}, message.params(), request_id,
                                    arrival_time=message.arrival_time, cache_salt=message.cache_salt)
        except Exception as exc:  # noqa: BLE001 - a bad request is its sender's error
            self._forget(request_id)
            self._send({message.client_index: [EngineCoreOutput(
                request_id, [], finished=True, error=f"{type(exc).__name__}: {exc}", rejected=True)]}, {})

    def _call(self, call: UtilityCall) -> None:
        result = UtilityResult(call.call_id)
        try:
            if call.method not in self.UTILITIES:
                raise ValueError(f"unknown engine core call {call.method!r}; known: {self.UTILITIES}")
            args = pickle.loads(call.args) if call.args else ()
            result.result = pickled(getattr(self, call.method)(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            result.error = f"{type(exc).__name__}: {exc}"
        self._results.setdefault(call.client_index, []).append(result)

    def _step(self) -> None:
        try:
            outputs = self.engine.step(make_output=self._output)
        except Exception as exc:  # noqa: BLE001 - a core bug fails the requests in flight, not the server
            logger.exception("engine step failed; failing every request in flight")
            self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            return
        by_client: dict[int, list[EngineCoreOutput]] = {}
        for output in outputs:
            if output is not None:
                client = (self._owner.pop if output.finished else self._owner.get)(output.request_id, None)
                if client is not None:
                    by_client.setdefault(client, []).append(output)
        self._send(by_client, {})

    def _output(self, request: Request) -> EngineCoreOutput | None:
        """A request's news for its API server: what engine.step() reports, as token-id deltas."""
        request_id, finished = request.request_id, request.is_finished
        if finished:
            self._streaming.discard(request_id)
            rejected = request_id in self._rejected
            self._rejected.discard(request_id)
        elif request_id not in self._streaming:
            return None
        logprobs = request.sampling_params.logprobs is not None
        first = request_id not in self._sent        # a request's first message carries its prompt logprobs
        prompt_logprobs = request.completed_prompt_logprobs() if first else None
        sent = self._sent.pop(request_id, [])
        sent += [0] * (len(request.seqs) - len(sent))
        completions = []
        for index, seq in enumerate(request.seqs):
            completions.append(CompletionDelta(
                index, seq.token_ids[seq.num_prompt_tokens + sent[index]:],
                seq.logprobs[sent[index]:] if logprobs else None, seq.cumulative_logprob if logprobs else None,
                None if seq.finish_reason is None else seq.finish_reason.value, seq.stop_reason))
            sent[index] = seq.num_output_tokens
        if not finished:
            self._sent[request_id] = sent
            return EngineCoreOutput(request_id, completions, prompt_logprobs=prompt_logprobs)
        metrics = RequestMetrics(request.arrival_time, request.first_scheduled_time, request.first_token_time,
                                 request.last_token_time, request.finished_time, request.num_cached_tokens,
                                 request.num_preemptions)
        return EngineCoreOutput(request_id, completions, True, request.error, rejected, metrics, prompt_logprobs)

    def _send(self, outputs: dict[int, list[EngineCoreOutput]], results: dict[int, list[UtilityResult]]) -> None:
        for client in outputs.keys() | results.keys():
            if client in self._lifelines:
                message = EngineCoreOutputs(outputs.get(client, []), results.get(client, []))
                self._outputs[client].send(self._encoder.encode(message), copy=False)
        results.clear()

    def _forget(self, request_id: str) -> None:
        self._owner.pop(request_id, None)
        self._streaming.discard(request_id)
        self._rejected.discard(request_id)
        self._sent.pop(request_id, None)

    def _fail_all(self, message: str) -> None:
        by_client: dict[int, list[EngineCoreOutput]] = {}
        for request_id, client in list(self._owner.items()):
            by_client.setdefault(client, []).append(EngineCoreOutput(request_id, [], True, message))
            self._forget(request_id)
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - best effort while failing
                logger.exception("could not abort %s", request_id)
        self._send(by_client, {})

    def _client_gone(self, index: int) -> None:
        """An API server went away: its requests are aborted (their blocks freed), its socket stays unused."""
        lifeline = self._lifelines.pop(index)
        self._poller.unregister(lifeline.fileno())
        lifeline.close()
        for request_id in [r for r, c in self._owner.items() if c == index]:
            self._forget(request_id)
            self.engine.abort_request(request_id)

    def _on_event(self, event: ev.Event) -> None:
        if event.kind == ev.REQUEST_REJECTED:
            self._rejected.add(event.data["request"].request_id)
        elif event.data["stats"].num_batched_tokens:
            self.recent_steps.append(event.data["stats"])

    # --- utilities -------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        from pagedlab.entrypoints.openai.metrics import engine_stats
        return engine_stats(self.engine)

    def steps(self, since: int = 0) -> list[dict]:
        """The statistics of the recent steps that did work, after step `since` (oldest first)."""
        newer = []
        for stats in reversed(self.recent_steps):
            if stats.step <= since:
                break
            newer.append(vars(stats))
        return newer[::-1]

    def metrics(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)

    def close(self) -> None:
        self._context.destroy(linger=1000)


def run_engine_core(model: str | None, engine_kwargs: dict, input_address: str, output_addresses: list[str],
                    ready: connection.Connection, lifelines: list[connection.Connection]) -> None:
    """The core process's main: build the engine, say so (or why not), then loop until the API servers are gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from pagedlab.engine.llm import build_engine
    from pagedlab.models.loader import resolve_device
    if resolve_device(engine_kwargs.get("device") or "auto").type == "cpu":
        # On the CPU the API servers need cores too: torch's threads spin-waiting for a core taken by an API server
        # make every step many times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - len(output_addresses)))
    try:
        engine = build_engine(model, **engine_kwargs)
        core = EngineCore(engine, input_address, output_addresses, lifelines)
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which raises it
        try:
            ready.send(("error", exc))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            ready.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
        return
    ready.send(("ready", CoreInfo(engine.config, engine.vocab_size, tuple(engine.scheduler.eos_token_ids),
                                  dict(getattr(engine, "kv_budget", {})), os.getpid())))
    ready.close()
    try:
        core.run()
    finally:
        core.close()
        engine.shutdown()


# --- the launcher ------------------------------------------------------------------------------------------------
class CoreProcess:
    """Starts the engine core for `num_clients` API servers and waits until its engine is built (raising the
    engine's own error if it could not be). `connection(i)` is what API server i needs; `shutdown()` stops it.
    wait=False returns at once, so API servers can start meanwhile; `wait_ready()` then gives the CoreInfo.
    `target` is the process's main (run_engine_core's signature; the lab's live core is another)."""

    def __init__(self, model: str | None, num_clients: int = 1, wait: bool = True,
                 target: Callable = run_engine_core, **engine_kwargs) -> None:
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="pagedlab-core-")
        self.input_address = f"ipc://{self._dir}/input"
        self.output_addresses = [f"ipc://{self._dir}/output-{i}" for i in range(num_clients)]
        pipes = [context.Pipe() for _ in range(num_clients)]
        self.lifelines = [front for front, _ in pipes]
        self._ready, ready_child = context.Pipe(duplex=False)
        self.info: CoreInfo | None = None
        # Not a daemon: under tensor parallelism the core spawns the other ranks.
        self.process = context.Process(
            target=target, name="pagedlab-engine-core", daemon=False,
            args=(model, engine_kwargs, self.input_address, self.output_addresses, ready_child,
                  [core for _, core in pipes]))
        self.process.start()
        ready_child.close()
        for _, core in pipes:
            core.close()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> CoreInfo:
        try:
            self.info = self._wait_ready(self._ready)
        except BaseException:
            self.shutdown()
            raise
        return self.info

    def _wait_ready(self, ready: connection.Connection) -> CoreInfo:
        connection.wait([ready, self.process.sentinel], timeout=STARTUP_TIMEOUT_S)
        try:
            status, payload = ready.recv() if ready.poll() else (None, None)
        except EOFError:
            status = payload = None
        finally:
            ready.close()
        if status == "ready":
            return payload
        if status == "error":
            raise payload
        self.process.join(5)
        raise RuntimeError(
            f"the engine core did not start (exit code {self.process.exitcode}; its error is printed above). It is "
            "spawned and re-imports the main module: a script that starts a server or an AsyncLLMEngine needs an "
            "`if __name__ == \"__main__\":` guard")

    def connection(self, client_index: int) -> CoreConnection:
        return CoreConnection(self.info, self.input_address, self.output_addresses[client_index], client_index,
                              self.lifelines[client_index])

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def shutdown(self) -> None:
        """Close the API servers' ends (the core leaves its loop), wait for it, then terminate if need be."""
        for lifeline in self.lifelines:
            lifeline.close()
        if self.process.pid is not None:
            self.process.join(SHUTDOWN_TIMEOUT_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        shutil.rmtree(self._dir, ignore_errors=True)
