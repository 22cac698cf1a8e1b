"""Incremental detokenization and stop strings: the text of a growing token sequence at O(new tokens) per step
(decoding the whole output every token would be O(n^2)), and where a stop string ends it.

This is the one implementation of stop strings. The offline engine's output stage (output_processor.py) runs it
after every Scheduler.update and finishes the sequences it stops; the API server's front end runs it on the engine
core's token-id deltas and tells the core to finish them (vLLM V1 splits it the same way: the core never sees text).

A Hugging Face "fast" tokenizer decodes through the tokenizers library's DecodeStream (Rust, about 1 us a token). A
tokenizer without that backend decodes a short window of recent tokens, as vLLM's slow-tokenizer path does: two
decode calls a token, whatever the output's length.
"""
from __future__ import annotations

from pagedlab.sampling_params import SamplingParams


class IncrementalDetokenizer:
    """One sequence's output text. `update(new_token_ids, finished)` decodes only the new ids and returns the stop
    string they completed, if any: the text is then cut at it (kept with include_stop_str_in_output), `num_tokens`
    counts the tokens up to the one that completed it, and later ids are not part of the output. Characters whose
    bytes are not complete yet (byte-level BPE) wait for the tokens that complete them; when the sequence finishes
    without, they are decoded as they stand (U+FFFD), as decoding the whole output would."""

    def __init__(self, tokenizer, params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        self.num_tokens = 0
        self.stop_reason: str | None = None
        self._text = ""
        self._pieces: list[str] = []    # decoded after _text, joined when the text is read
        self._num_chars = 0
        self._stops = params.stop_strings
        self._tail = ""                 # the last max(len(stop)) - 1 characters: where a stop string may begin
        self._tail_chars = max(map(len, self._stops), default=1) - 1
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        self._last: int | None = None   # the token that completed the text so far
        self._held: list[int] = []      # the tokens after it, whose text is not complete yet
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream
            stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
            self._step = lambda token_id: stream.step(backend, token_id)
        else:
            self._step = WindowDecoder(self._decode).step

    @property
    def text(self) -> str:
        if self._pieces:
            self._text += "".join(self._pieces)
            self._pieces.clear()
        return self._text

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def update(self, token_ids: list[int], finished: bool = False) -> str | None:
        if self.stop_reason is not None:
            return None
        for token_id in token_ids:      # one at a time: a stop string names the token that completed it
            self.num_tokens += 1
            piece = self._step(token_id)
            if not piece:
                self._held.append(token_id)
                continue
            self._last = token_id
            if self._held:
                self._held = []
            if self._stops and self._add_checking_stops(piece):
                return self.stop_reason
            self._pieces.append(piece)
            self._num_chars += len(piece)
        if finished and self._held:
            context = [] if self._last is None else [self._last]
            before = self._decode(context) if context else ""
            self._pieces.append(self._decode(context + self._held)[len(before):])
            self._held = []
        return None

    def _add_checking_stops(self, piece: str) -> bool:
        """Look for a stop string ending in the new piece (it may begin in the tail before it); the earliest one in
        the text wins, the first listed on a tie. True if one did: the text is cut there."""
        window = self._tail + piece
        self._tail = window[-self._tail_chars:] if self._tail_chars else ""
        if self.num_tokens < self._min_tokens:
            return False
        hit, num_old = None, len(window) - len(piece)
        for stop in self._stops:
            at = window.find(stop, max(0, num_old - len(stop) + 1))
            if at != -1 and (hit is None or at < hit[0]):
                hit = (at, stop)
        if hit is None:
            return False
        at, stop = hit
        end = self._num_chars - (len(window) - len(piece)) + at + (len(stop) if self._include_stop else 0)
        self._pieces.append(piece)
        self._text = self.text[:end]
        self.stop_reason = stop
        return True


class WindowDecoder:
    """Incremental decoding with only `tokenizer.decode`: the text a new token adds is the decode of a window of
    recent tokens with it minus the decode without it. The window restarts after every token that completed text,
    so each step decodes a few tokens, never the whole output. Text that is still an incomplete character (U+FFFD at
    the end) waits for the next token."""

    def __init__(self, decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._read = 0          # self._ids[:_read] is the window's context, already emitted

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[:self._read]) if self._read else ""
        after = self._decode(self._ids)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        del self._ids[:self._read]
        self._read = len(self._ids)
        return after[len(before):]
