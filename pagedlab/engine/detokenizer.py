"""Incremental detokenization: the text of a growing token sequence at O(new tokens) per step, where decoding the
whole output every token would be O(n^2). The engine (stop strings) and the API server (streaming) share it, so both
see the same text for the same tokens.

It is the tokenizers library's DecodeStream (Rust, about 1 us a token), which every Hugging Face "fast" tokenizer has
underneath; a tokenizer without that backend (a slow SentencePiece one) decodes the whole output each time.
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
        else:
            self._ids.extend(token_ids)
            self.text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
