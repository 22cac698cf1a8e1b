"""Tool calls in chat completions, as vLLM serves them.

tool_choice "none" generates text; a named function or "required" constrains the output with structured outputs
(the named function's arguments against its parameters schema; "required": a JSON array of {name, parameters}
calls, at least one); "auto" lets the model write text and, with --enable-auto-tool-choice --tool-call-parser
hermes, parses the hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the one Qwen2.5 and
Qwen3 templates teach) out of it. Streaming sends every call as it is generated, as vLLM does: its first delta
the id, type and name, then fragments of its arguments (json_members.py finds them in the text so far); a call's
arguments are the JSON text the model wrote, streamed or not.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from pagedlab.entrypoints.openai.errors import OpenAIError
from pagedlab.entrypoints.openai.json_members import CONTAINERS, MemberScanner, ObjectSpans
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


def arguments_text(scanner: MemberScanner, call: ObjectSpans, key: str) -> str | None:
    """A call's arguments once they are whole (None before): the raw JSON the model wrote, decoded where the model
    gave them as a JSON string, "{}" where it gave none."""
    member = call.members.get(key)
    if member is None:
        return "{}" if call.complete else None
    if member.end is None:
        return None
    raw = scanner.value(member)
    if member.kind == '"':
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _scanned_calls(scanner: MemberScanner, calls: list, key: str) -> list[ToolCall]:
    return [ToolCall(id=new_call_id(), function=FunctionCall(name=call["name"],
                                                             arguments=arguments_text(scanner, spans, key)))
            for call, spans in zip(calls, scanner.objects)]


def _is_call(call, key: str) -> bool:
    return isinstance(call, dict) and isinstance(call.get("name"), str) and (
        key not in call or isinstance(call[key], (dict, str)))


def parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    """(content before the first call, the calls); text with no parsable call comes back whole."""
    start = text.find(HERMES_START)
    if start == -1:
        return text, []
    calls = []
    for payload in HERMES_CALL.findall(text[start:]):
        try:
            call = json.loads(payload)
        except json.JSONDecodeError:
            return text, []
        if not _is_call(call, "arguments"):
            return text, []
        scanner = MemberScanner()
        scanner.feed(payload)
        calls += _scanned_calls(scanner, [call], "arguments")
    return text[:start], calls


def parse_required(text: str) -> list[ToolCall]:
    """The calls of a "required" output (ValueError when it is not a complete array of calls: cut short)."""
    calls = json.loads(text)
    if not isinstance(calls, list) or not all(_is_call(c, "parameters") and "parameters" in c for c in calls):
        raise ValueError("not an array of tool calls")
    scanner = MemberScanner(depth=1)
    scanner.feed(text)
    return _scanned_calls(scanner, calls, "parameters")


def parse_output(choice, text: str, auto_parser: str | None, parallel: bool = True
                 ) -> tuple[str | None, list[ToolCall]]:
    """The message's (content, tool_calls) for a finished output; parallel=False keeps the first call only.
    Arguments are the JSON text the model wrote, as the stream sends them."""
    if isinstance(choice, NamedToolChoice):
        return None, [ToolCall(id=new_call_id(), function=FunctionCall(name=choice.function.name, arguments=text))]
    if choice == "required":
        try:
            return None, parse_required(text)
        except ValueError:      # cut short by max_tokens: not a call (json.JSONDecodeError is a ValueError)
            return text, []
    if choice == "auto" and auto_parser == "hermes":
        content, calls = parse_hermes(text)
        return (content or None) if calls else content, calls if parallel else calls[:1]
    return text, []


@dataclass
class CallProgress:
    """What one streamed call has sent."""
    id: str = field(default_factory=new_call_id)
    name_sent: bool = False
    arguments_sent: int = 0     # raw characters of the arguments value
    done: bool = False


@dataclass
class ToolStream:
    """One streamed choice's deltas: `feed` each text delta, `finish` at the end.

    A named call streams its arguments as they come (the whole output is the arguments). "required" (a JSON
    array of {name, parameters}) and hermes calls are scanned as they arrive: a call's first delta carries its
    id, type and name once the name is whole, the next ones the fragments of its arguments; in "auto", the text
    before the first `<tool_call>` goes out as content, holding back what could be the start of the marker."""
    choice: object
    auto_parser: str | None
    parallel: bool = True
    text: str = ""
    content_sent: int = 0
    calls: list[CallProgress] = field(default_factory=list)
    scanners: list[MemberScanner] = field(default_factory=list)    # required: one; hermes: one per <tool_call>
    scanned: int = 0        # hermes: characters of text fed to the scanners (or skipped between blocks)
    in_block: bool = False

    @property
    def hermes(self) -> bool:
        return self.choice == "auto" and self.auto_parser == "hermes"

    def feed(self, delta: str) -> DeltaMessage | None:
        self.text += delta
        if isinstance(self.choice, NamedToolChoice):
            first = not self.calls
            if first:
                self.calls.append(CallProgress(name_sent=True))
            return DeltaMessage(tool_calls=[DeltaToolCall(
                index=0, id=self.calls[0].id if first else None, type="function" if first else None,
                function=DeltaFunctionCall(name=self.choice.function.name if first else None, arguments=delta))])
        if self.choice == "required":
            if not self.scanners:
                self.scanners.append(MemberScanner(depth=1))
            self.scanners[0].feed(delta)
            return self._message(None, self._call_deltas("parameters"))
        if self.hermes:
            start = self.text.find(HERMES_START)
            end = start if start != -1 else _safe_end(self.text, HERMES_START)
            content = None
            if end > self.content_sent:
                content, self.content_sent = self.text[self.content_sent:end], end
            self._scan_hermes()
            return self._message(content, self._call_deltas("arguments"))
        return DeltaMessage(content=delta)

    def finish(self) -> tuple[list[DeltaMessage], bool]:
        """Deltas still to send, and whether the choice made tool calls (its output parses as calls)."""
        if isinstance(self.choice, NamedToolChoice):
            return [], True
        if self.choice != "required" and not self.hermes:
            return [], False
        _, calls = parse_output(self.choice, self.text, self.auto_parser, self.parallel)
        if calls or any(c.name_sent for c in self.calls):
            return [], bool(calls)
        rest = self.text[self.content_sent:]      # no call after all: the text is content
        return ([DeltaMessage(content=rest)] if rest else []), False

    def _scan_hermes(self) -> None:
        """Feed the text since the last step to the scanner of its <tool_call> block, opening one per block; a
        block ends at </tool_call> (held back while the text could be the start of it: scanners see no markers)."""
        while True:
            if not self.in_block:
                start = self.text.find(HERMES_START, self.scanned)
                if start == -1:
                    return
                self.scanners.append(MemberScanner())
                self.scanned, self.in_block = start + len(HERMES_START), True
            end = self.text.find(HERMES_END, self.scanned)
            stop = self.scanned + _safe_end(self.text[self.scanned:], HERMES_END) if end == -1 else end
            self.scanners[-1].feed(self.text[self.scanned:stop])
            self.scanned = stop
            if end == -1:
                return
            self.scanned, self.in_block = end + len(HERMES_END), False

    def _call_deltas(self, key: str) -> list[DeltaToolCall]:
        objects = [(scanner, call) for scanner in self.scanners for call in scanner.objects]
        deltas = []
        for index, (scanner, call) in enumerate(objects[:None if self.parallel else 1]):
            if index == len(self.calls):
                self.calls.append(CallProgress())
            progress, name = self.calls[index], call.members.get("name")
            if progress.done:
                continue
            delta = DeltaToolCall(index=index, function=DeltaFunctionCall())
            if not progress.name_sent:
                if name is None or name.end is None or name.kind != '"':
                    continue
                progress.name_sent = True
                delta.id, delta.type = progress.id, "function"
                delta.function.name = json.loads(scanner.value(name))
            delta.function.arguments = self._arguments_fragment(scanner, call, progress, key) or None
            if delta.function.name is not None or delta.function.arguments is not None:
                deltas.append(delta)
        return deltas

    @staticmethod
    def _arguments_fragment(scanner: MemberScanner, call: ObjectSpans, progress: CallProgress, key: str) -> str:
        member = call.members.get(key)
        if member is not None and member.kind in CONTAINERS:     # an object, sent as it grows
            fragment = scanner.value(member)[progress.arguments_sent:]
            progress.arguments_sent += len(fragment)
            progress.done = member.end is not None
            return fragment
        whole = arguments_text(scanner, call, key)      # a string or nothing: sent once whole
        progress.done = whole is not None
        return whole or ""

    @staticmethod
    def _message(content: str | None, deltas: list[DeltaToolCall]) -> DeltaMessage | None:
        if content is None and not deltas:
            return None
        return DeltaMessage(content=content, tool_calls=deltas or None)


def _safe_end(text: str, marker: str) -> int:
    """Length of text that cannot be the start of marker."""
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
