"""Structured outputs: SamplingParams.structured_outputs compiled by xgrammar into a token-level grammar.

The engine hands a request's spec to `StructuredOutputManager.submit`, which compiles it on a worker thread (off the
engine loop) through one xgrammar GrammarCompiler, whose cache makes a repeated schema free. The request joins the
scheduler once its grammar is ready; an invalid spec rejects it with the compiler's message. A RequestGrammar holds
one GrammarMatcher per sequence: the sampler asks them for the next-token bitmask and feeds them the drawn tokens.
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
