"""Structured outputs: SamplingParams.structured_outputs compiled by xgrammar into a token-level grammar.

The engine hands a request's spec to `StructuredOutputManager.submit`, which compiles it on a worker thread (off the
engine loop) through one xgrammar GrammarCompiler, whose cache makes a repeated schema free. The request joins the
scheduler once its grammar is ready; an invalid spec rejects it with the compiler's message. A RequestGrammar holds
one GrammarMatcher per sequence. Each step the engine fills the grammar rows' next-token bitmask (`fill_bitmask`,
while the device runs the forward pass), hands it to the executor as plain data for the sampler to apply, and
feeds the drawn tokens back (`accept_tokens`).
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor

from pagedlab.sampling_params import StructuredOutputsParams


class StructuredOutputError(ValueError):
    """The schema, regex, choice or grammar cannot be compiled; the message says what is wrong."""


class RequestGrammar:
    def __init__(self, compiled, num_seqs: int) -> None:
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(num_seqs)]

    def matcher_for(self, row):
        """A forking row's samples all start from the initial state, which matcher 0 holds."""
        return self.matchers[0 if row.num_samples > 1 else row.seq_index]

    def matcher_after(self, row, sample: int):
        """The matcher that takes a row's sample-th drawn token."""
        return self.matchers[sample if row.num_samples > 1 else row.seq_index]


_batch_matcher = None


def fill_bitmask(rows, vocab_size: int):
    """rows: the step's sampling rows (the scheduler's ScheduledSeq), in batch order. The bitmask of their grammar
    rows, filled by one multithreaded xgrammar call, as a layers.logits_processors.GrammarBitmask; None when no row
    has a grammar still running (one past its end under ignore_eos has nothing to mask)."""
    global _batch_matcher
    import xgrammar as xgr

    from pagedlab.layers.logits_processors import GrammarBitmask

    matchers, masked = [], []
    for i, row in enumerate(rows):
        if row.request.grammar is not None:
            matcher = row.request.grammar.matcher_for(row)
            if not matcher.is_terminated():
                matchers.append(matcher)
                masked.append(i)
    if not masked:
        return None
    if _batch_matcher is None:
        _batch_matcher = xgr.BatchGrammarMatcher()
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab_size)      # all allowed
    _batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, masked)
    return GrammarBitmask(bitmask, masked)


def accept_tokens(rows, results) -> None:
    """Advance each grammar row's matchers by the tokens drawn for it (a forking row: sample k -> sequence k), in
    one xgrammar call. rows: the step's scheduled rows, results the executor's, aligned."""
    import xgrammar as xgr

    matchers, accepted = [], []
    for row, result in zip(rows, results):
        grammar = row.request.grammar
        if grammar is None or result is None:
            continue
        for k, token in enumerate(result.token_ids):
            matcher = grammar.matcher_after(row, k)
            if not matcher.is_terminated():
                matchers.append(matcher)
                accepted.append(token)
    if matchers and not all(xgr.BatchGrammarMatcher.batch_accept_token(matchers, accepted)):
        raise RuntimeError("a token was sampled outside its grammar")


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._compiler = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedlab-grammar")

    @property
    def compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.eos_token_ids or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        return self._compiler

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar (raising StructuredOutputError)."""
        return self._pool.submit(self.compile, spec)

    def compile(self, spec: StructuredOutputsParams):
        kind, text = spec.key
        try:
            if kind == "json":
                schema = json.loads(text)
                check_json_schema(schema)
                return self.compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "regex":
                return self.compiler.compile_regex(text)
            if kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(spec.choice))
            if kind == "grammar":
                return self.compiler.compile_grammar(text)
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)   # as vLLM
        except StructuredOutputError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError subclasses
            raise StructuredOutputError(f"invalid structured_outputs.{kind}: {first_line(exc)}") from exc

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def check_json_schema(schema) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise StructuredOutputError(f"invalid structured_outputs.json: a JSON schema is an object, got {schema!r}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "the top level"
        raise StructuredOutputError(f"invalid structured_outputs.json at {where}: {exc.message}") from None


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are the choices (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
