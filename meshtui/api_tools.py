"""Tools on the chat route, decided purely: `tools` and `tool_choice` in, prompt turns and a grammar out, and the
reply read back as tool calls.

The format is llama.cpp's "generic" one (common/chat.cpp), for models whose chat template does not take tools
(SmolLM2's does not): the tools are described in the system turn, and the reply is constrained by a grammar built
from a JSON schema to `{"tool_call": {"name": .., "arguments": {..}}}` (`{"tool_calls": [..]}` when parallel calls
are allowed) or, under `tool_choice="auto"`, `{"response": ".."}`. Each call's arguments are constrained to its
function's own JSON schema, so a call always validates. Earlier calls and tool results in `messages` are written
back in the same JSON, as llama.cpp's template polyfills write them.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshtui.api_grammar import json_schema_grammar
from meshtui.api_openai import ApiError
from meshtui.api_tool_calls import CallScanner, partial_response

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CHOICES = ("auto", "none", "required")
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    """One function the client offers; `parameters` is its JSON schema as canonical JSON text."""

    name: str
    description: str | None
    parameters: str

    def schema(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.parameters)
        return loaded

    def described(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.schema()
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the id the API gives it, the function's name, its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of tools. `choice`: auto, none, required or function (then `named` is set)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    named: str | None = None
    parallel: bool = True

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools the model may call: none under `none`, only the named one under a named choice."""
        if self.choice == "none":
            return ()
        if self.named is not None:
            return tuple(t for t in self.tools if t.name == self.named)
        return self.tools

    @property
    def constrained(self) -> bool:
        return bool(self.offered)

    @property
    def many(self) -> bool:
        """Several calls in one reply (`tool_calls`); a named choice makes exactly one call."""
        return self.parallel and self.named is None

    def reply_schema(self) -> dict[str, Any]:
        """The JSON schema every reply must match (llama.cpp's generic format, without the model-made ids)."""
        calls = [_call_schema(t) for t in self.offered]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.many:
            call = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": one, "minItems": 1}},
                    "required": ["tool_calls"]}
        else:
            call = {"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"]}
        if self.choice != "auto":
            return call
        response = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
        return {"anyOf": [call, response]}

    def grammar(self) -> str:
        """The reply's GBNF grammar (root rule `root`), from the reply schema."""
        return schema_grammar(self.reply_schema(), "tools")

    def instructions(self) -> str:
        """What the system turn tells the model: the tools, and the JSON to answer with."""
        key = "tool_calls" if self.many else "tool_call"
        example = {"name": self.offered[0].name, "arguments": {}}
        shape = json.dumps({key: [example] if self.many else example})
        listed = json.dumps([t.described() for t in self.offered], indent=2)
        if self.choice == "auto":
            how = (f"Respond in JSON format, either with `{key}` (a request to call tools) or with `response` reply "
                   "to the user's request")
        else:
            how = f"Respond in JSON format with `{key}` (a request to call tools)"
        return (f"You can call any of the following tools to satisfy the user's requests: {listed}\n\n"
                f"Example tool call syntax:\n\n{shape}\n\n{how}")


def _call_schema(tool: Tool) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"name": {"type": "string", "const": tool.name}, "arguments": tool.schema()},
        "required": ["name", "arguments"],
    }
    if tool.description:
        schema["description"] = tool.description
    return schema


def schema_grammar(schema: Mapping[str, Any], param: str) -> str:
    """GBNF for a JSON schema (response_format's converter); a schema it cannot take is a 400 naming `param`."""
    return json_schema_grammar(schema, param)


# -- the request ----------------------------------------------------------------------------------------------


def parse_tool_use(body: Mapping[str, Any]) -> ToolUse | None:
    """The request's tool fields, checked; None when it offers no tools. Every bad entry is a 400 naming it."""
    tools_value = body.get("tools")
    choice_value = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if tools_value is None or tools_value == []:
        if choice_value not in (None, "none"):
            raise ApiError(400, "'tool_choice' is only allowed when 'tools' are specified", param="tool_choice")
        return None
    if not isinstance(tools_value, list):
        raise ApiError(400, "'tools' must be an array of function tools", param="tools")
    tools = tuple(_tool(entry, i) for i, entry in enumerate(tools_value))
    names = [t.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ApiError(400, f"tools[{i}].function.name: '{name}' is offered twice",
                           param=f"tools[{i}].function.name")
    choice, named = _choice(choice_value, names)
    use = ToolUse(tools, choice, named, True if parallel is None else parallel)
    if use.constrained:
        use.grammar()  # a schema the converter refuses is the request's error, found now
    return use


def _tool(entry: Any, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(entry, dict):
        raise ApiError(400, f"{where} must be an object", param=where)
    _only(entry, ("type", "function"), where)
    if entry.get("type") != "function":
        raise ApiError(400, f"{where}.type must be 'function' (the only tool type served)", param=f"{where}.type")
    function = entry.get("function")
    if not isinstance(function, dict):
        raise ApiError(400, f"{where}.function must be an object", param=f"{where}.function")
    _only(function, ("name", "description", "parameters", "strict"), f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ApiError(400, f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'",
                       param=f"{where}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ApiError(400, f"{where}.function.description must be a string", param=f"{where}.function.description")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ApiError(400, f"{where}.function.strict must be a boolean", param=f"{where}.function.strict")
    parameters = function.get("parameters", NO_PARAMETERS)
    if not isinstance(parameters, dict):
        raise ApiError(400, f"{where}.function.parameters must be a JSON schema object",
                       param=f"{where}.function.parameters")
    schema_grammar(parameters, f"{where}.function.parameters")
    return Tool(name, description, json.dumps(parameters, sort_keys=False))


def _only(obj: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    for key in obj:
        if key not in known:
            raise ApiError(400, f"{where}.{key} is not supported", param=f"{where}.{key}")


def _choice(value: Any, names: Sequence[str]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in _CHOICES:
            raise ApiError(400, f"'tool_choice' must be one of {', '.join(_CHOICES)} or a named function",
                           param="tool_choice")
        return value, None
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "'tool_choice' must be one of auto, none, required or "
                            '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    if name not in names:
        raise ApiError(400, f"tool_choice.function.name: '{name}' is not one of the tools offered",
                       param="tool_choice.function.name")
    return "function", name


def tool_request(body: Any) -> tuple[Any, ToolUse | None]:
    """A chat request's body without its tool fields (turns about tools written as plain turns), and what it
    asks of tools. A body that is not an object is passed on for the chat route to refuse."""
    if not isinstance(body, dict):
        return body, None
    use = parse_tool_use(body)
    if use is not None and use.constrained:
        for name, asked in (("logprobs", bool(body.get("logprobs"))), ("n", body.get("n") not in (None, 1)),
                            ("response_format", body.get("response_format") not in (None, {"type": "text"}))):
            if asked:
                raise ApiError(400, f"'{name}' is not supported together with 'tools'", param=name)
    messages = body.get("messages")
    plain_already = not (isinstance(messages, list)
                         and any(isinstance(m, dict) and "tool_calls" in m for m in messages))
    if use is None and not uses_tool_turns(messages) and plain_already:
        return {k: v for k, v in body.items() if k not in TOOL_FIELDS}, None
    plain = {k: v for k, v in body.items() if k not in TOOL_FIELDS}
    plain["messages"] = plain_messages(body.get("messages"), use)
    return plain, use


# -- the conversation ----------------------------------------------------------------------------------------


def uses_tool_turns(messages: Any) -> bool:
    """Whether `messages` holds earlier tool calls or tool results (they are written back as JSON)."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def plain_messages(messages: Any, use: ToolUse | None) -> list[Any]:
    """The turns as plain text turns: the tools described in the system turn, calls and results as JSON.
    Anything not about tools is passed on as it is (the chat route checks it)."""
    if not isinstance(messages, list):
        return messages  # the chat route names what is wrong
    names: dict[str, str] = {}
    turns: list[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            turns.append(message)
            continue
        role = message.get("role")
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            turns.append({"role": "assistant", "content": _calls_text(calls, i, names, use)})
        elif role == "assistant" and "tool_calls" in message:  # an empty list: no calls
            turns.append({k: v for k, v in message.items() if k != "tool_calls"})
        elif role == "tool":
            turns.append({"role": "user", "content": _result_text(message, i, names)})
        else:
            turns.append(message)
    if use is not None and use.constrained:
        first = turns[0] if turns else None
        if isinstance(first, dict) and first.get("role") in ("system", "developer") and isinstance(
                first.get("content"), str):
            turns[0] = {"role": "system", "content": f"{first['content']}\n\n{use.instructions()}"}
        else:
            turns.insert(0, {"role": "system", "content": use.instructions()})
    return turns


def _calls_text(calls: Any, i: int, names: dict[str, str], use: ToolUse | None) -> str:
    where = f"messages.[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be an array", param=where)
    written = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise ApiError(400, f"{where}[{j}] must be a function call with a name and arguments (a JSON string)",
                           param=f"{where}[{j}]")
        try:
            parsed = json.loads(arguments)
        except ValueError as err:
            raise ApiError(400, f"{where}[{j}].function.arguments is not JSON: {err}",
                           param=f"{where}[{j}].function.arguments") from err
        call_id = call.get("id")
        if isinstance(call_id, str):
            names[call_id] = name
        written.append({"name": name, "arguments": parsed})
    many = use.many if use is not None else len(written) > 1
    return json.dumps({"tool_calls": written} if many or len(written) > 1 else {"tool_call": written[0]})


def _result_text(message: Mapping[str, Any], i: int, names: Mapping[str, str]) -> str:
    where = f"messages.[{i}]"
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        if not all(isinstance(p, str) for p in parts):
            raise ApiError(400, f"{where}.content: only text parts are supported", param=f"{where}.content")
        content = "".join(p for p in parts if p is not None)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be the tool's result as a string", param=f"{where}.content")
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise ApiError(400, f"{where}.tool_call_id must name the call this result answers",
                       param=f"{where}.tool_call_id")
    response: dict[str, Any] = {"tool": names.get(call_id, message.get("name") or ""), "content": content}
    response["tool_call_id"] = call_id
    return json.dumps({"tool_response": response})


# -- the reply -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolReply:
    """A whole reply read back: text for the user, or the calls made (then content is None)."""

    content: str | None
    calls: tuple[ToolCall, ...] = ()


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def read_reply(text: str, use: ToolUse, ids: Sequence[str] = ()) -> ToolReply:
    """The reply's JSON as OpenAI's message; text that is not the format (cut by max_tokens) stays text. Calls
    take the `ids` given (a stream sent them already), new ones after those; their arguments are the model's text."""
    if not use.constrained:
        return ToolReply(text)
    try:
        value = json.loads(text, strict=False)  # the grammar lets raw control characters into strings
    except ValueError:  # cut short (max_tokens): what was generated, with finish "length"
        partial = partial_response(text)
        return ToolReply(text if partial is None else partial[0])
    if not isinstance(value, dict):
        return ToolReply(text)
    if isinstance(value.get("response"), str):
        return ToolReply(value["response"])
    found = value.get("tool_calls", [value.get("tool_call")])
    scanned = CallScanner()
    scanned.pieces(text)
    calls = []
    for i, call in enumerate(found if isinstance(found, list) else []):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
            return ToolReply(text)
        arguments = (scanned.arguments[i] if len(scanned.arguments) == len(found)
                     else json.dumps(call["arguments"], ensure_ascii=False))
        calls.append(ToolCall(ids[i] if i < len(ids) else new_call_id(), call["name"], arguments))
    return ToolReply(None, tuple(calls)) if calls else ToolReply(text)

