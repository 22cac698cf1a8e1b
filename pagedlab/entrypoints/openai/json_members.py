"""Where the members of JSON objects lie in text that is still arriving: how tool calls are streamed.

A MemberScanner is fed the text as it is generated and keeps, for each JSON object at one nesting depth (0: the
text is one object, as in a hermes `<tool_call>`; 1: an array of them, as tool_choice "required" writes), the span
of each top-level member's value in the text: open until the value ends. Keys are decoded, values stay raw text, so a
call's arguments can be sent as they grow, fragment by fragment, and the fragments add up to exactly the text the
model wrote. It only tracks strings and nesting: whether the text is valid JSON is json.loads' to say, at the end.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

CONTAINERS = ("{", "[")


@dataclass
class Member:
    start: int                  # the value's first character in the scanned text
    kind: str                   # "{", "[", '"', or "" for a number, true, false or null
    end: int | None = None      # one past its last character; None while the value is open


@dataclass
class ObjectSpans:
    members: dict[str, Member] = field(default_factory=dict)
    complete: bool = False


class MemberScanner:
    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self.text = ""
        self.objects: list[ObjectSpans] = []
        self._stack: list[str] = []         # the open containers
        self._in_string = self._escaped = False
        self._string_start = 0
        self._key = ""
        self._value: Member | None = None   # the member value being read
        self._expect = ""                   # directly inside an object at `depth`: key, colon, value, comma

    def feed(self, text: str) -> None:
        begin = len(self.text)
        self.text += text
        for i in range(begin, len(self.text)):
            self._step(i, self.text[i])

    def value(self, member: Member) -> str:
        """A member's raw text as far as it has arrived."""
        return self.text[member.start:len(self.text) if member.end is None else member.end]

    def _step(self, i: int, c: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif c == "\\":
                self._escaped = True
            elif c == '"':
                self._in_string = False
                self._string_closed(i)
            return
        in_object = len(self._stack) == self.depth + 1 and self._stack[-1] == "{"
        if in_object and self._value is not None and self._value.kind == "" and (c in ",}" or c.isspace()):
            self._close_value(i)
        if c == '"':
            self._in_string, self._string_start = True, i
            if in_object and self._expect == "value":
                self._open_value(i, c)
        elif c in CONTAINERS:
            if len(self._stack) == self.depth and c == "{":
                self.objects.append(ObjectSpans())
                self._expect = "key"
            elif in_object and self._expect == "value":
                self._open_value(i, c)
            self._stack.append(c)
        elif c in "}]":
            if self._stack:
                self._stack.pop()
            if len(self._stack) == self.depth + 1 and self._value is not None and self._value.kind in CONTAINERS:
                self._close_value(i + 1)
            elif len(self._stack) == self.depth and c == "}" and self.objects:
                self.objects[-1].complete = True
                self._expect = ""
        elif in_object:
            if c == ":" and self._expect == "colon":
                self._expect = "value"
            elif c == "," and self._expect == "comma":
                self._expect = "key"
            elif not c.isspace() and self._expect == "value":
                self._open_value(i, "")

    def _string_closed(self, i: int) -> None:
        if not (len(self._stack) == self.depth + 1 and self._stack[-1] == "{"):
            return
        if self._expect == "key":
            try:
                self._key = json.loads(self.text[self._string_start:i + 1])
            except json.JSONDecodeError:        # a bad escape: not a key anyone can name
                self._key = self.text[self._string_start + 1:i]
            self._expect = "colon"
        elif self._value is not None and self._value.kind == '"':
            self._close_value(i + 1)

    def _open_value(self, i: int, kind: str) -> None:
        self._value = self.objects[-1].members[self._key] = Member(i, kind)
        self._expect = "in value"

    def _close_value(self, end: int) -> None:
        self._value.end = end
        self._value = None
        self._expect = "comma"
