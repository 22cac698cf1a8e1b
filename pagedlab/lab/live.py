"""The real engine, live: it steps in a background thread on a steady stream of requests, and every step's
statistics arrive through its event bus. A learner's own message joins the same batch: its block table and text
are recorded after every step, so a view can show its blocks filling while the model answers.

Only the engine thread touches the engine; everyone else reads the rows it leaves behind and hands messages in
through a queue.
"""
from __future__ import annotations

import bisect
import gc
import itertools
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import pandas as pd

from pagedlab import events as ev
from pagedlab.engine.llm import build_engine
from pagedlab.lab.models import lab_model
from pagedlab.sampling_params import SamplingParams
from pagedlab.sequence import RequestStatus
from pagedlab.sim.workloads import make_trace


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


def _release_device_memory() -> None:
    """Free the previous engine's KV cache before the next engine measures what is free. The engine sits in
    reference cycles (its scheduler calls back into it), so only the cycle collector frees it."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class ChatTurn:
    """A learner's message and the engine's answer so far, with the answer's blocks after the last step."""
    message: str
    request_id: str
    max_tokens: int = 96
    prompt_tokens: int = 0
    block_size: int = 0
    answer: str = ""
    status: str = "waiting"
    blocks: list[tuple[int, int]] = field(default_factory=list)    # (physical block id, slots filled)
    error: str | None = None


class LiveEngine:
    """Runs `build_engine(model, **engine_kwargs)` in a background thread, keeping `backlog` requests waiting so it
    is always busy. `rows` gets one dict per step (StepStats + memory accounting + wall seconds); `marks` one
    (seconds, label) per (re)start. Both survive restarts, so before and after a change can be compared."""

    def __init__(self, model: str | None = None, workload: str = "sharegpt", backlog: int = 64) -> None:
        self.model = model or lab_model()
        self.workload = workload
        self.backlog = backlog
        self.rows: list[dict] = []
        self.marks: list[tuple[float, str]] = []
        self.chats: list[ChatTurn] = []
        self.engine = None
        self.ended = None              # the engine whose run is over (not one being built or started)
        self.error: str | None = None
        self._messages: queue.Queue[ChatTurn] = queue.Queue()
        self._origin = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def seconds(self) -> float:
        return time.monotonic() - self._origin

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, run_seconds: float = 60.0, label: str = "", **engine_kwargs) -> None:
        """Stop the current engine, build a new one with `engine_kwargs`, run it for `run_seconds`.
        Raises ConfigError (with the engine's message) when the settings cannot work."""
        self.stop()
        self.engine = None
        _release_device_memory()
        engine = build_engine(self.model, **engine_kwargs)
        engine.report_unfinished = False
        engine.bus.subscribe(lambda event: self._on_event(engine, event), [ev.STEP])
        self.engine, self.error = engine, None
        self.marks.append((self.seconds(), label or f"block {engine.kv.block_size}, {engine.kv.num_blocks} blocks"))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(engine, run_seconds), daemon=True)
        self._thread.start()

    def send(self, message: str, max_tokens: int = 96) -> ChatTurn:
        """Queue a chat message for the running engine; its answer and blocks fill in the returned turn."""
        turn = ChatTurn(message, f"chat-{len(self.chats) + 1}", max_tokens)
        self.chats.append(turn)
        self._messages.put(turn)
        return turn

    def _run(self, engine, run_seconds: float) -> None:
        vocab_size = engine.executor.hf_config.vocab_size
        requests = request_stream(self.workload, engine.config.scheduler.max_model_len, vocab_size)
        deadline = time.monotonic() + run_seconds
        talking: dict[str, tuple[ChatTurn, object]] = {}
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                while not self._messages.empty():
                    turn = self._messages.get()
                    talking[turn.request_id] = (turn, self._add_chat(engine, turn))
                while len(engine.scheduler.waiting) < self.backlog:
                    prompt, params = next(requests)
                    engine.add_request({"prompt_token_ids": prompt}, params)
                engine.step()
                for request_id, (turn, request) in list(talking.items()):
                    if _follow(engine, turn, request):
                        del talking[request_id]
        except Exception as exc:  # noqa: BLE001 - shown on the dashboard instead of dying silently in a thread
            self.error = f"{type(exc).__name__}: {exc}"
        for turn, _ in talking.values():
            turn.status = "stopped with the engine"
        self.ended = engine

    def _add_chat(self, engine, turn: ChatTurn):
        tokenizer = engine.tokenizer
        messages = [{"role": "user", "content": turn.message}]
        if getattr(tokenizer, "chat_template", None):
            prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
        else:
            prompt = tokenizer.encode(turn.message)
        room = engine.config.scheduler.max_model_len - len(prompt)
        turn.prompt_tokens = len(prompt)
        params = SamplingParams(temperature=0.0, max_tokens=max(1, min(turn.max_tokens, room)))
        request = engine.add_request({"prompt_token_ids": prompt}, params, request_id=turn.request_id)
        waiting = engine.scheduler.waiting
        if request in waiting:       # the learner's message goes ahead of the synthetic backlog
            waiting.remove(request)
            waiting.appendleft(request)
        return request

    def _on_event(self, engine, event: ev.Event) -> None:
        stats = event.data["stats"]
        usage = engine.memory_usage().as_dict()
        self.rows.append({**vars(stats), "kv_usage": stats.kv_usage, "wall": self.seconds(),
                          "run": len(self.marks) - 1, **{f"mem_{k}": v for k, v in usage.items()}})

    def frame(self, last_seconds: float | None = None) -> pd.DataFrame:
        """The rows so far (or of the last `last_seconds`) as a DataFrame."""
        rows = list(self.rows)
        if last_seconds is not None and rows:
            rows = rows[bisect.bisect_left(rows, rows[-1]["wall"] - last_seconds, key=lambda row: row["wall"]):]
        return pd.DataFrame(rows)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        self._stop.set()
        self.wait()


def _follow(engine, turn: ChatTurn, request) -> bool:
    """Copy a chat request's state into its turn (engine thread only); True once it is over."""
    seq = request.seqs[0]
    over = request.status is RequestStatus.FINISHED
    turn.status, turn.error = request.status.value, request.error
    if not over:      # a finished request's blocks are freed: keep the table of its last step
        size = turn.block_size = engine.kv.block_size
        turn.blocks = [(block, min(size, max(seq.num_tokens - i * size, 0)))
                       for i, block in enumerate(engine.kv.block_table(seq))]
    if engine.tokenizer is not None:
        turn.answer = engine.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
    return over
