"""Pydantic models of the OpenAI API requests and responses the server speaks (plus vLLM's sampling extras).

Requests only check types here; value ranges are SamplingParams' job, so a bad value is reported with the same
message (naming the field) whether it comes through the API or `LLM.generate`. Unknown fields are kept (and logged
as ignored by the server, as vLLM does); documented fields the server does not implement are listed in each
request's UNSUPPORTED, which the server answers with a 400 naming the field when one is set to anything else than
its default.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate ("\\ud800" is valid JSON, not text)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate_path(key, path) or lone_surrogate_path(item, f"{path}.{key}" if path else key)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate_path(item, f"{path}[{i}]")
            if found:
                return found
    return None


class RequestModel(BaseModel):
    # NaN or infinite sampling values would poison the sampler's arithmetic rather than fail validation.
    model_config = ConfigDict(allow_inf_nan=False, extra="allow")


class TopLevelRequest(RequestModel):
    # field -> (its default, what to say): set to anything else, the server answers 400 naming the field
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        where = lone_surrogate_path(data)
        if where:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate (such as \\ud800), which is not valid "
                             "Unicode text")
        return data


class StreamOptions(RequestModel):
    include_usage: bool = False


class StructuredOutputsRequest(RequestModel):
    """vLLM's `structured_outputs` object (exactly one constraint)."""
    json_: str | dict | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    model_config = ConfigDict(allow_inf_nan=False, extra="allow", populate_by_name=True)


class JsonSchemaFormat(RequestModel):
    name: str = "response"
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(allow_inf_nan=False, extra="allow", populate_by_name=True)


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(TopLevelRequest):
    """The fields /v1/completions and /v1/chat/completions share."""
    model: str
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    # vLLM's older names for structured_outputs' fields
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    return_tokens_as_token_ids: bool = False
    request_id: str | None = None
    # vLLM fields this server does not implement (see UNSUPPORTED)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    priority: int = 0
    spaces_between_special_tokens: bool = True
    logits_processors: list | None = None
    vllm_xargs: dict | None = None
    kv_transfer_params: dict | None = None
    cache_salt: str | None = None
    return_token_ids: bool = False
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, str]]] = {
        "use_beam_search": (False, "beam search is not supported"),
        "length_penalty": (1.0, "length_penalty only applies to beam search, which is not supported"),
        "priority": (0, "priority scheduling is not supported (the scheduler is first come, first served)"),
        "spaces_between_special_tokens": (True, "only the tokenizer's own decoding is supported"),
        "logits_processors": (None, "custom logits processors are not supported"),
        "vllm_xargs": (None, "vllm_xargs is not supported"),
        "kv_transfer_params": (None, "KV transfer is not supported"),
        "cache_salt": (None, "cache_salt is not supported over the API"),
        "return_token_ids": (False, "token ids are not returned: use logprobs with return_tokens_as_token_ids"),
        "guided_whitespace_pattern": (None, "a custom whitespace pattern is not supported"),
    }


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    add_special_tokens: bool = True
    suffix: str | None = None
    best_of: int | None = None
    prompt_embeds: Any = None
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, str]]] = {
        **SamplingRequest.UNSUPPORTED,
        "suffix": (None, "suffix is not supported (as in vLLM V1)"),
        "prompt_embeds": (None, "prompt embeddings are not supported"),
    }


class ContentPart(RequestModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    documents: list[dict] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # OpenAI and vLLM fields this server does not implement (see UNSUPPORTED)
    functions: list | None = None
    function_call: Any = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None
    echo: bool = False
    add_special_tokens: bool = False
    mm_processor_kwargs: dict | None = None
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, str]]] = {
        **SamplingRequest.UNSUPPORTED,
        "functions": (None, "the deprecated functions field is not supported: use tools"),
        "function_call": (None, "the deprecated function_call field is not supported: use tool_choice"),
        "audio": (None, "audio output is not supported"),
        "modalities": (None, "only text output is supported"),
        "prediction": (None, "predicted outputs are not supported"),
        "web_search_options": (None, "web search is not supported"),
        "reasoning_effort": (None, "reasoning_effort is not supported"),
        "verbosity": (None, "verbosity is not supported"),
        "store": (None, "stored completions are not supported"),
        "metadata": (None, "metadata is only for stored completions, which are not supported"),
        "service_tier": (None, "service tiers are not supported"),
        "add_special_tokens": (False, "the chat template adds the special tokens"),
        "mm_processor_kwargs": (None, "multimodal inputs are not supported"),
    }


class TokenizeRequest(TopLevelRequest):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(TopLevelRequest):
    model: str | None = None
    tokens: list[int]


# --- responses ------------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class Logprob(BaseModel):
    """vLLM's shape of one prompt logprob entry."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Logprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]


class AssistantMessage(BaseModel):
    role: str = "assistant"     # with add_generation_prompt false, the last message's role (it is continued)
    content: str | None
    tool_calls: list[ToolCall] = []


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, Logprob] | None] | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedlab"
    root: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
