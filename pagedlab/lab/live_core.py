"""The lab's live engine in a process of its own: the server's engine core (engine/core_proc.py) running a *run*,
a steady stream of synthetic requests for a set time, and reporting every step to the notebook.

The notebook's kernel only receives step reports and draws them, so a fast engine cannot starve the kernel's
message loop of the GIL. One core process serves a dashboard for its whole life; a restart with new settings
rebuilds the engine inside it (`start_run`), which costs the engine's build, not a process start.

Utilities (the client's calls, answered between two steps): `start_run(engine_kwargs, seconds, workload,
backlog)` gives the new engine's figures or the ConfigError that its settings raise; `stop_run()`; `chat(message,
max_tokens)` puts a learner's message ahead of the backlog and follows it. Reports of a few steps travel together
(at most REPORT_SECONDS apart), each with the step's StepStats, the cache's slot accounting and the followed
requests' block tables and text.
"""
from __future__ import annotations

import gc
import itertools
import os
import random
import signal
import sys
import time
from multiprocessing import connection

from pagedlab import events as ev
from pagedlab.config import ConfigError
from pagedlab.engine.core_messages import EngineCoreOutputs, FollowedRequest, StepReport
from pagedlab.engine.core_proc import CoreInfo, EngineCore
from pagedlab.sampling_params import SamplingParams
from pagedlab.sequence import RequestStatus
from pagedlab.sim.workloads import make_trace

REPORT_SECONDS = 0.02


def request_stream(workload: str, max_model_len: int, vocab_size: int, seed: int = 0):
    """Endless (prompt token ids, SamplingParams) pairs with a workload's lengths, scaled from its 2048-token
    traces down to max_model_len; `ignore_eos` keeps each output at its drawn length."""
    rng = random.Random(seed)
    scale = min(1.0, max_model_len / 2048)
    for r in itertools.cycle(make_trace(workload, 1000, seed)):
        prompt_len = max(1, round(r.prompt_len * scale))
        output_len = max(1, min(round(r.output_len * scale), max_model_len - prompt_len))
        prompt = [rng.randrange(4, vocab_size) for _ in range(prompt_len)]
        yield prompt, SamplingParams(n=r.n, temperature=0.8, max_tokens=output_len, ignore_eos=True,
                                     seed=rng.randrange(2**31))


def _nothing(request) -> None:
    return None


class LiveCore(EngineCore):
    """An engine core whose requests it makes itself; its one client (index 0) watches every step."""
    UTILITIES = ("start_run", "stop_run", "chat", "stats")

    def __init__(self, model: str | None, input_address: str, output_addresses: list[str],
                 lifelines: list[connection.Connection]) -> None:
        self.model = model
        self._last_sent = 0.0
        super().__init__(None, input_address, output_addresses, lifelines)

    def _bind(self, engine) -> None:
        self.engine = engine
        self._deadline = 0.0                       # > 0 while a run is on
        self._followed: dict[str, object] = {}     # request id -> the Request of a learner's message
        self._prompt_tokens: dict[str, int] = {}
        self._reports: list[StepReport] = []
        if engine is not None:
            engine.report_unfinished = False
            engine.bus.subscribe(self._on_step, [ev.STEP])

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        while self._lifelines:
            if self._take_inputs(block=not self._deadline) and self._deadline:
                self._step()

    def _step(self) -> None:
        engine = self.engine
        if time.monotonic() >= self._deadline:
            self._end("time")
            return
        try:
            while len(engine.scheduler.waiting) < self._backlog:
                prompt, params = next(self._requests)
                engine.add_request({"prompt_token_ids": prompt}, params)
            engine.step(make_output=_nothing)
        except Exception as exc:  # noqa: BLE001 - the run ends and the notebook shows why
            self._end(f"{type(exc).__name__}: {exc}")
            return
        if time.monotonic() - self._last_sent >= REPORT_SECONDS:
            self._flush()

    def _on_step(self, event: ev.Event) -> None:
        stats = event.data["stats"]
        self._reports.append(StepReport(time.monotonic(), {**vars(stats), "kv_usage": stats.kv_usage},
                                        self.engine.memory_usage().as_dict(), self._follow()))

    def _follow(self, ended: bool = False) -> list[FollowedRequest]:
        """The followed requests as they stand; a finished one is reported once more, then let go."""
        engine, out = self.engine, []
        for request_id, request in list(self._followed.items()):
            seq, over = request.seqs[0], request.status is RequestStatus.FINISHED
            status = "stopped with the engine" if ended and not over else request.status.value
            size = engine.kv.block_size
            blocks = [] if over else [(block, min(size, max(seq.num_tokens - i * size, 0)))
                                      for i, block in enumerate(engine.kv.block_table(seq))]
            text = engine.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True) \
                if engine.tokenizer is not None else ""
            out.append(FollowedRequest(request_id, status, text, self._prompt_tokens[request_id], size, blocks,
                                       request.error))
            if over or ended:
                del self._followed[request_id]
        return out

    def _end(self, reason: str) -> None:
        self._deadline = 0.0
        self._reports.append(StepReport(time.monotonic(), followed=self._follow(ended=True), ended=reason))
        self._flush()

    def _flush(self) -> None:
        if self._reports and 0 in self._lifelines:
            self._outputs[0].send(self._encoder.encode(EngineCoreOutputs(steps=self._reports)), copy=False)
        self._reports = []
        self._last_sent = time.monotonic()

    def _client_gone(self, index: int) -> None:
        lifeline = self._lifelines.pop(index)
        self._poller.unregister(lifeline.fileno())
        lifeline.close()

    # --- utilities -----------------------------------------------------------------------------------------------
    def start_run(self, engine_kwargs: dict, seconds: float, workload: str, backlog: int):
        """Replace the engine by one built with `engine_kwargs` and run it for `seconds`: its figures, or the
        ConfigError its settings raise (returned, so the notebook raises it as such)."""
        from pagedlab.engine.llm import build_engine

        if self._deadline:
            self._end("restarted")
        self._bind(None)
        _release_device_memory()
        try:
            engine = build_engine(self.model, **engine_kwargs)
        except ConfigError as exc:
            return exc
        self._bind(engine)
        self._requests = request_stream(workload, engine.config.scheduler.max_model_len, engine.vocab_size)
        self._backlog = backlog
        self._deadline = time.monotonic() + seconds
        return {"device": engine.kv_budget["device"], "num_blocks": engine.kv.num_blocks,
                "block_size": engine.kv.block_size, "bytes_per_block": engine.bytes_per_block,
                "max_model_len": engine.config.scheduler.max_model_len}

    def stop_run(self) -> None:
        if self._deadline:
            self._end("stopped")

    def chat(self, message: str, max_tokens: int) -> str:
        """Queue a learner's message ahead of the synthetic backlog and follow it; its request id."""
        engine = self.engine
        if not self._deadline:
            raise RuntimeError("the engine is not running")
        tokenizer = engine.tokenizer
        if getattr(tokenizer, "chat_template", None):
            prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                        add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
        else:
            prompt = tokenizer.encode(message)
        room = engine.config.scheduler.max_model_len - len(prompt)
        request_id = f"chat-{len(self._prompt_tokens) + 1}"
        params = SamplingParams(temperature=0.0, max_tokens=max(1, min(max_tokens, room)))
        request = engine.add_request({"prompt_token_ids": prompt}, params, request_id=request_id)
        waiting = engine.scheduler.waiting
        if request in waiting:
            waiting.remove(request)
            waiting.appendleft(request)
        self._followed[request_id], self._prompt_tokens[request_id] = request, len(prompt)
        return request_id

    def stats(self) -> dict:
        return {} if self.engine is None else super().stats()

    def close(self) -> None:
        self._context.destroy(linger=0)         # the one client is gone: nothing left to deliver


def _release_device_memory() -> None:
    """Free the previous engine's KV cache before the next engine measures what is free. The engine sits in
    reference cycles (its scheduler calls back into it), so only the cycle collector frees it."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_live_core(model: str | None, engine_kwargs: dict, input_address: str, output_addresses: list[str],
                  ready: connection.Connection, lifelines: list[connection.Connection]) -> None:
    """The live core process's main (CoreProcess's `target`): no engine until the first `start_run`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    if not torch.cuda.is_available():
        # Leave the notebook's kernel a core to draw on: torch threads spin-waiting for a taken core make every
        # step many times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    core = LiveCore(model, input_address, output_addresses, lifelines)
    ready.send(("ready", CoreInfo(None, None, (), {}, os.getpid())))
    ready.close()
    try:
        core.run()
    finally:
        core.close()
    # Nothing is left to tear down that the OS does not: skip the interpreter's own (seconds, with torch loaded),
    # so a dashboard closes, or a kernel restarts, at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
