"""Tool calls read from a constrained reply as it arrives: each call's name once it is whole, then its arguments'
JSON text as it comes, so a stream can send OpenAI's `tool_calls` deltas while the model writes them.

The grammar (`api_tools.ToolUse.grammar`) puts every call as `{"name": "..", "arguments": {..}}` (name first), in
`{"tool_call": ..}` or `{"tool_calls": [..]}`. The arguments are the model's own JSON text, which the grammar made
valid against the function's schema: whole replies and streams hand clients the same string.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_CALLS = re.compile(r'^\s*\{\s*"tool_calls?"\s*:')
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


@dataclass(frozen=True)
class CallPiece:
    """Something new about call `index`: its name (when the call begins) or more of its arguments' text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class CallScanner:
    """Scans a reply's text (fed whole each time, growing) for calls; `pieces` says what is new since the last."""

    names: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    _pos: int = 0
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def pieces(self, text: str) -> list[CallPiece]:
        if not _CALLS.match(text):
            return []  # a `response`, or not yet known
        found: list[CallPiece] = []
        while self._pos < len(text):
            if not self.names or self.finished[-1]:
                head = _CALL_HEAD.search(text, self._pos)
                if head is None:
                    break  # the next call's head is still arriving
                self.names.append(json.loads(f'"{head.group(1)}"', strict=False))
                self.arguments.append("")
                self.finished.append(False)
                found.append(CallPiece(len(self.names) - 1, name=self.names[-1]))
                self._pos, self._depth = head.end(), 0
            start = self._pos
            while self._pos < len(text) and not self.finished[-1]:
                self._step(text[self._pos])
                self._pos += 1
                self.finished[-1] = self._depth == 0
            if self._pos > start:
                self.arguments[-1] += text[start:self._pos]
                found.append(CallPiece(len(self.names) - 1, arguments=text[start:self._pos]))
        return found

    def _step(self, c: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif c == "\\":
                self._escaped = True
            elif c == '"':
                self._in_string = False
        elif c == '"':
            self._in_string = True
        elif c in "{[":
            self._depth += 1
        elif c in "}]":
            self._depth -= 1


_RESPONSE = re.compile(r'^\s*\{\s*"response"\s*:\s*"')


def partial_response(text: str) -> tuple[str, bool] | None:
    """The `response` string of a reply still arriving, decoded as far as it goes, and whether it is whole;
    None when the reply is not (or not yet known to be) a `response`."""
    match = _RESPONSE.match(text)
    if match is None:
        return None
    rest = text[match.end():]
    i, whole = 0, False
    while i < len(rest):
        c = rest[i]
        if c == '"':
            whole = True
            break
        if c == "\\":
            step = 6 if rest[i + 1:i + 2] == "u" else 2
            if i + step > len(rest):
                break  # an escape still arriving
            i += step
            continue
        i += 1
    decoded: str = json.loads(f'"{rest[:i]}"', strict=False)
    if not whole and decoded and "\ud800" <= decoded[-1] <= "\udbff":
        decoded = decoded[:-1]  # half of a surrogate pair: the other half is still to come
    return decoded, whole
