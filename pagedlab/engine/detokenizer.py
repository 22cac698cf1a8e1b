"""Incremental detokenization: the text of a growing token sequence at O(new tokens) per step, where decoding the
whole output every token would be O(n^2). The engine (stop strings) and the API server (streaming) share it, so both
see the same text for the same tokens.

The fast path is the tokenizers library's DecodeStream (Rust, about 1 us a token); a tokenizer without a Rust backend
decodes a short window over the last tokens instead, as vLLM's prefix/read offsets do.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    """The text of a growing token sequence; `add(ids)` decodes only what the new ids change. Characters whose bytes
    are not complete yet (byte-level BPE) wait for the tokens that complete them."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.text = ""
        self._num_tokens = 0
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        else:
            self._tokenizer, self._skip = tokenizer, skip_special_tokens
            self._ids: list[int] = []
            self._prefix = self._read = 0      # decode ids[prefix:] and keep what ids[prefix:read] did not give

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def add(self, token_ids: list[int]) -> None:
        self._num_tokens += len(token_ids)
        if self._backend is not None:
            for token_id in token_ids:
                piece = self._stream.step(self._backend, token_id)
                if piece:
                    self.text += piece
            return
        self._ids.extend(token_ids)
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=self._skip)  # noqa: E731
        before = decode(self._ids[self._prefix:self._read])
        after = decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
