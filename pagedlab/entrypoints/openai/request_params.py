"""An OpenAI/vLLM request body -> SamplingParams: every field applied, or a 400 naming it.

Documented fields this server does not implement are each request class's UNSUPPORTED (a 400 when set to anything
but the default); unknown fields are ignored with a logged warning, as vLLM does. Structured-output constraints
arrive under several names (response_format, vLLM's structured_outputs object and its older guided_* fields, tool
choices); at most one may be given.
"""
from __future__ import annotations

import json
import logging
import re

from pagedlab.entrypoints.openai.errors import OpenAIError
from pagedlab.entrypoints.openai.protocol import SamplingRequest, TopLevelRequest
from pagedlab.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("pagedlab")
STRUCTURED_FIELDS = ("json", "regex", "choice", "grammar", "json_object")


def reject_unsupported(body: TopLevelRequest) -> None:
    for name, (default, why) in body.UNSUPPORTED.items():
        if getattr(body, name) != default:
            raise OpenAIError(400, f"{name} is not supported by this server: {why}", param=name)
    if body.model_extra:
        logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.model_extra)))


def structured_outputs(body: SamplingRequest) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint, and the field it came from."""
    found: list[tuple[str, dict]] = []
    if body.response_format is not None and body.response_format.type != "text":
        fmt = body.response_format
        if fmt.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise OpenAIError(400, "response_format of type json_schema needs json_schema.schema",
                              param="response_format")
        else:
            found.append(("response_format", {"json": fmt.json_schema.json_schema}))
    if body.structured_outputs is not None:
        so = body.structured_outputs
        for name, why in (("structural_tag", "structural tags are not supported"),
                          ("whitespace_pattern", "a custom whitespace pattern is not supported"),
                          ("disable_additional_properties", "only the schema's own additionalProperties apply")):
            if getattr(so, name):
                raise OpenAIError(400, f"structured_outputs.{name} is not supported: {why}",
                                  param=f"structured_outputs.{name}")
        given = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                 "json_object": so.json_object}
        found.append(("structured_outputs", {k: v for k, v in given.items() if v is not None}))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if getattr(body, name) is not None:
            found.append((name, {key: getattr(body, name)}))
    if body.guided_decoding_backend not in (None, "auto", "xgrammar"):
        raise OpenAIError(400, f"guided_decoding_backend {body.guided_decoding_backend!r} is not available: this "
                               "server's grammar backend is xgrammar", param="guided_decoding_backend")
    if not found:
        return None, None
    if len(found) > 1:
        raise OpenAIError(400, "give one structured-output constraint, got " + " and ".join(f for f, _ in found),
                          param=found[1][0])
    source, spec = found[0]
    if isinstance(spec.get("json"), str):
        try:
            spec["json"] = json.loads(spec["json"])
        except json.JSONDecodeError as exc:
            raise OpenAIError(400, f"{source}: the JSON schema is not JSON: {exc}", param=source) from exc
    try:
        return StructuredOutputsParams(**spec), source
    except ValueError as exc:
        raise OpenAIError(400, f"{source}: {exc}", param=source) from exc


def logit_bias(body: SamplingRequest, vocab_size: int) -> dict[int, float] | None:
    if not body.logit_bias:
        return None
    bias = {}
    for key, value in body.logit_bias.items():
        if not re.fullmatch(r"\d+", key) or int(key) >= vocab_size:
            raise OpenAIError(400, f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                              param="logit_bias")
        bias[int(key)] = value
    return bias


def sampling_params(body: SamplingRequest, *, max_tokens: int | None, logprobs: int | None, vocab_size: int,
                    max_num_seqs: int, prompt_logprobs: int | None = None,
                    constraint: StructuredOutputsParams | None = None) -> SamplingParams:
    if body.n > max_num_seqs:
        raise OpenAIError(400, f"n ({body.n}) is larger than max_num_seqs ({max_num_seqs}): its samples could "
                               "never run together", param="n")
    for name in ("stop_token_ids", "allowed_token_ids"):
        ids = getattr(body, name)
        bad = [t for t in ids or () if not 0 <= t < vocab_size]
        if bad:
            raise OpenAIError(400, f"{name} must be token ids in [0, {vocab_size}), got {bad[:5]}", param=name)

    def given(value, default):
        return default if value is None else value
    try:
        return SamplingParams(
            n=body.n, temperature=given(body.temperature, 1.0), top_p=given(body.top_p, 1.0),
            top_k=given(body.top_k, 0), min_p=given(body.min_p, 0.0), seed=body.seed, stop=body.stop,
            stop_token_ids=body.stop_token_ids, max_tokens=max_tokens, min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos, logprobs=logprobs, presence_penalty=given(body.presence_penalty, 0.0),
            frequency_penalty=given(body.frequency_penalty, 0.0),
            repetition_penalty=given(body.repetition_penalty, 1.0),
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens, prompt_logprobs=prompt_logprobs,
            logit_bias=logit_bias(body, vocab_size), allowed_token_ids=body.allowed_token_ids,
            bad_words=body.bad_words, structured_outputs=constraint)
    except ValueError as exc:
        field = re.match(r"SamplingParams\.(\w+)", str(exc))
        raise OpenAIError(400, str(exc), param=field and field.group(1)) from exc
