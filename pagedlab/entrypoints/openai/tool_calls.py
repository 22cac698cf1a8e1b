"""Tool calls in chat completions, as vLLM serves them.

tool_choice "none" generates text; a named function or "required" constrains the output with structured outputs
(the named function's arguments against its parameters schema; "required": a JSON array of {name, parameters}
calls, at least one); "auto" lets the model write text and, with --enable-auto-tool-choice --tool-call-parser
hermes, parses the hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the one Qwen2.5 and
Qwen3 templates teach) out of it. Streaming sends a named call's arguments as they are generated and the other
calls once they are complete.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from pagedlab.entrypoints.openai.errors import OpenAIError
from pagedlab.entrypoints.openai.protocol import (ChatCompletionRequest, ChatMessage, DeltaFunctionCall,
                                                  DeltaMessage, DeltaToolCall, FunctionCall, NamedToolChoice,
                                                  ToolCall)
from pagedlab.sampling_params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes",)
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_choice(body: ChatCompletionRequest, auto_enabled: bool) -> str | NamedToolChoice:
    """The effective choice ("none", "auto", "required" or a named function), checked against the tools."""
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
    if choice != "none" and not body.tools:
        raise OpenAIError(400, f"tool_choice {_describe(choice)} needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in body.tools}:
        raise OpenAIError(400, f"tool_choice names the function {choice.function.name!r}, which is not among the "
                               f"tools ({', '.join(t.function.name for t in body.tools)})", param="tool_choice")
    if choice == "auto" and not auto_enabled:
        raise OpenAIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                               "set", param="tool_choice")
    return choice


def _describe(choice) -> str:
    return f"function {choice.function.name!r}" if isinstance(choice, NamedToolChoice) else repr(choice)


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_constraint(body: ChatCompletionRequest, choice) -> StructuredOutputsParams | None:
    """What a named or required choice forces the output to be."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in body.tools if t.function.name == choice.function.name)
        return StructuredOutputsParams(json=_parameters(tool))
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                   "parameters": _parameters(t)},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in body.tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)
    return None


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates read them: assistant tool calls with their arguments as objects."""
    conversation = []
    for m in messages:
        entry = {"role": m.role, "content": m.text()}
        if m.name is not None:
            entry["name"] = m.name
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _loads_or_text(c.function.arguments)}} for c in m.tool_calls]
        conversation.append(entry)
    return conversation


def _loads_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    """(content before the first call, the calls); text with no parsable call comes back whole."""
    start = text.find(HERMES_START)
    if start == -1:
        return text, []
    calls = []
    for payload in HERMES_CALL.findall(text[start:]):
        try:
            call = json.loads(payload)
            name, arguments = call["name"], call.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            return text, []
        calls.append(ToolCall(id=new_call_id(), function=FunctionCall(
            name=name, arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))))
    return text[:start], calls


def parse_required(text: str) -> list[ToolCall]:
    calls = json.loads(text)
    return [ToolCall(id=new_call_id(), function=FunctionCall(name=c["name"], arguments=json.dumps(c["parameters"])))
            for c in calls]


def parse_output(choice, text: str, auto_parser: str | None, parallel: bool = True
                 ) -> tuple[str | None, list[ToolCall]]:
    """The message's (content, tool_calls) for a finished output; parallel=False keeps the first call only."""
    if isinstance(choice, NamedToolChoice):
        return None, [ToolCall(id=new_call_id(), function=FunctionCall(name=choice.function.name, arguments=text))]
    if choice == "required":
        try:
            return None, parse_required(text)
        except (json.JSONDecodeError, KeyError, TypeError):     # cut short by max_tokens: not a call
            return text, []
    if choice == "auto" and auto_parser == "hermes":
        content, calls = parse_hermes(text)
        return (content or None) if calls else content, calls if parallel else calls[:1]
    return text, []


@dataclass
class ToolStream:
    """One streamed choice's tool-call deltas: `feed` each text delta, `finish` at the end."""
    choice: object
    auto_parser: str | None
    parallel: bool = True
    text: str = ""
    content_sent: int = 0
    call_id: str = field(default_factory=new_call_id)

    def feed(self, delta: str) -> DeltaMessage | None:
        self.text += delta
        if isinstance(self.choice, NamedToolChoice):
            first = len(self.text) == len(delta)
            return DeltaMessage(tool_calls=[DeltaToolCall(
                index=0, id=self.call_id if first else None, type="function" if first else None,
                function=DeltaFunctionCall(name=self.choice.function.name if first else None, arguments=delta))])
        if self.choice == "required":
            return None
        if self.choice == "auto" and self.auto_parser == "hermes":
            # content up to a call, holding back what could be the start of "<tool_call>"
            start = self.text.find(HERMES_START)
            end = start if start != -1 else _safe_end(self.text, HERMES_START)
            if end > self.content_sent:
                content, self.content_sent = self.text[self.content_sent:end], end
                return DeltaMessage(content=content)
            return None
        return DeltaMessage(content=delta)

    def finish(self) -> tuple[list[DeltaMessage], bool]:
        """Deltas still to send, and whether the choice made tool calls."""
        if isinstance(self.choice, NamedToolChoice):
            return [], True
        if self.choice == "required":
            content, calls = parse_output(self.choice, self.text, self.auto_parser)
        elif self.choice == "auto" and self.auto_parser == "hermes":
            content, calls = parse_output(self.choice, self.text, self.auto_parser, self.parallel)
            content = (self.text if not calls else content or "")[self.content_sent:]
        else:
            return [], False
        deltas = [DeltaMessage(content=content)] if content else []
        deltas += [DeltaMessage(tool_calls=[DeltaToolCall(index=i, id=c.id, type="function", function=DeltaFunctionCall(
            name=c.function.name, arguments=c.function.arguments))]) for i, c in enumerate(calls)]
        return deltas, bool(calls)


def _safe_end(text: str, marker: str) -> int:
    """Length of text that cannot be the start of marker."""
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
