"""Tools on the chat route, decided purely (meshtui/api_tools.py): requests checked, turns written, replies read."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshtui.api_features import route_features
from meshtui.api_http import ApiRequestRecord
from meshtui.api_openai import ApiError
from meshtui.api_tool_calls import partial_response
from meshtui.api_tool_replies import ToolStreamReader
from meshtui.api_tools import ToolUse, parse_tool_use, read_reply, tool_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def refused(body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as err:
        tool_request(body)
    assert err.value.status == 400
    return err.value


@pytest.mark.parametrize(("tools", "param", "message"), [
    ("get_weather", "tools", "'tools' must be an array of function tools"),
    ([WEATHER, 3], "tools[1]", "tools[1] must be an object"),
    ([{"type": "code_interpreter"}], "tools[0].type", "tools[0].type must be 'function' (the only tool type served)"),
    ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name",
     "tools[0].function.name must be 1 to 64 letters, digits, '_' or '-'"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters",
     "tools[0].function.parameters must be a JSON schema object"),
    ([{"type": "function", "function": {"name": "f", "returns": {}}}], "tools[0].function.returns",
     "tools[0].function.returns is not supported"),
    ([WEATHER, WEATHER], "tools[1].function.name", "tools[1].function.name: 'get_weather' is offered twice"),
])
def test_a_bad_tools_entry_is_refused_by_name(tools: Any, param: str, message: str) -> None:
    err = refused({"messages": [], "tools": tools})
    assert (err.param, err.message) == (param, message)


def test_a_schema_the_grammar_cannot_take_is_refused_by_name() -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}
    err = refused({"tools": [CLOCK, bad]})
    assert err.param == "tools[1].function.parameters"
    assert err.message.startswith("'tools[1].function.parameters' cannot be turned into a grammar: ")


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "logprobs": True}, "logprobs"),
    ({"tools": [WEATHER], "n": 2}, "n"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_tool_choice_and_what_tools_cannot_be_combined_with(body: dict[str, Any], param: str) -> None:
    assert refused({"messages": [], **body}).param == param


def test_choices_decide_what_the_reply_may_be() -> None:
    auto = parse_tool_use({"tools": [WEATHER, CLOCK]})
    assert auto is not None and (auto.choice, auto.many, [t.name for t in auto.offered]) == (
        "auto", True, ["get_weather", "get_time"])
    assert [set(alt["properties"]) for alt in auto.reply_schema()["anyOf"]] == [{"tool_calls"}, {"response"}]
    named = parse_tool_use({"tools": [WEATHER, CLOCK], "tool_choice": {"type": "function",
                                                                       "function": {"name": "get_time"}}})
    assert named is not None and [t.name for t in named.offered] == ["get_time"] and not named.many
    assert named.reply_schema() == {"type": "object", "required": ["tool_call"], "properties": {"tool_call": {
        "type": "object", "required": ["name", "arguments"], "properties": {
            "name": {"type": "string", "const": "get_time"}, "arguments": {"type": "object", "properties": {}}}}}}
    required = parse_tool_use({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False})
    assert required is not None and set(required.reply_schema()["properties"]) == {"tool_call"}
    none = parse_tool_use({"tools": [WEATHER], "tool_choice": "none"})
    assert none is not None and not none.constrained and none.offered == ()
    assert parse_tool_use({"tools": [], "tool_choice": "none"}) is None


def test_tools_go_in_the_system_turn_and_earlier_calls_and_results_as_json() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    ]
    body, use = tool_request({"model": "m", "messages": messages, "tools": [WEATHER], "parallel_tool_calls": False})
    assert use is not None and set(body) == {"model", "messages"}
    turns = body["messages"]
    assert turns[0]["role"] == "system" and turns[0]["content"].startswith("Be brief.\n\nYou can call any of")
    assert turns[0]["content"].endswith("either with `tool_call` (a request to call tools) or with `response` "
                                        "reply to the user's request")
    assert turns[1:] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}'},
        {"role": "user", "content": '{"tool_response": {"tool": "get_weather", "content": "22 C, sunny", '
                                    '"tool_call_id": "call_1"}}'},
    ]
    plain, none = tool_request({"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": True})
    assert none is None and plain == {"messages": [{"role": "user", "content": "hi"}]}
    err = refused({"messages": [{"role": "tool", "content": "x"}]})
    assert err.param == "messages.[0].tool_call_id"


def use_of(**body: Any) -> ToolUse:
    use = parse_tool_use({"tools": [WEATHER, CLOCK], **body})
    assert use is not None
    return use


def test_replies_read_back_as_calls_or_text() -> None:
    use = use_of()
    calls = read_reply('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                       '{"name": "get_time", "arguments": {}}]}', use)
    assert calls.content is None
    assert [(c.name, c.arguments) for c in calls.calls] == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    assert len({c.id for c in calls.calls}) == 2 and all(c.id.startswith("call_") for c in calls.calls)
    assert read_reply('{"response": "Hello\\nthere"}', use).content == "Hello\nthere"
    assert read_reply('{"response": "cut sho', use).content == "cut sho"  # max_tokens: what came
    assert read_reply('{"tool_calls": [{"name": "get_w', use).content == '{"tool_calls": [{"name": "get_w'
    assert read_reply('{"response": "x"}', use_of(tool_choice="none")).content == '{"response": "x"}'


def fed(reply: str, cuts: list[int]) -> tuple[ToolStreamReader, list[dict[str, Any]]]:
    """The reply fed in pieces of the given sizes (the rest in one), and every delta sent, the last ones too."""
    reader = ToolStreamReader(use_of())
    deltas, at = [], 0
    for cut in [*cuts, len(reply)]:
        deltas += reader.feed(reply[at:at + cut])
        at += cut
    return reader, deltas


@given(st.text(), st.lists(st.integers(min_value=1, max_value=7), max_size=40))
def test_a_streamed_response_is_the_same_text_under_any_chunking(text: str, cuts: list[int]) -> None:
    reply = json.dumps({"response": text})
    reader, deltas = fed(reply, cuts)
    whole, rest = reader.finish()
    assert "".join(d["content"] for d in deltas + rest) == text == whole.content
    assert partial_response(reply) == (text, True)


CALLS = ('{"tool_calls": [{"name": "get_weather", "arguments": { "city": "O\\"slo}]" , "x": [1, {"y": 2}]}}, '
         '{ "name" : "get_time", "arguments": {}}]}')


@given(st.lists(st.integers(min_value=1, max_value=9), max_size=60))
def test_streamed_calls_assemble_into_the_whole_reply_under_any_chunking(cuts: list[int]) -> None:
    reader, deltas = fed(CALLS, cuts)
    whole, rest = reader.finish()
    assert rest == [] and whole.content is None
    assembled: dict[int, dict[str, str]] = {}
    for delta in deltas:
        (call,) = delta["tool_calls"]
        into = assembled.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
        into["id"] += call.get("id", "")
        into["name"] += call["function"].get("name", "")
        into["arguments"] += call["function"]["arguments"]
    assert [tuple(c.values()) for c in assembled.values()] == [(c.id, c.name, c.arguments) for c in whole.calls]
    assert [c.arguments for c in whole.calls] == ['{ "city": "O\\"slo}]" , "x": [1, {"y": 2}]}', "{}"]
    assert [json.loads(c.arguments) for c in whole.calls] == [{"city": 'O"slo}]', "x": [1, {"y": 2}]}, {}]
    heads = [d for d in deltas if "id" in d["tool_calls"][0]]
    assert [h["tool_calls"][0]["function"] for h in heads] == [{"name": "get_weather", "arguments": ""},
                                                                {"name": "get_time", "arguments": ""}]


def test_a_call_cut_by_max_tokens_is_text() -> None:
    reader, deltas = fed(CALLS[:70], [])
    whole, rest = reader.finish()
    assert whole.content == CALLS[:70] and whole.calls == () and rest == []
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"  # sent as it came


def test_the_request_log_names_the_features_a_request_used() -> None:
    body = {"messages": [{"role": "tool", "tool_call_id": "c", "content": "1"}], "tools": [WEATHER],
            "tool_choice": "required", "logprobs": True, "seed": 7}
    assert route_features(body) == ("tools", "tool_choice=required", "tool_results")
    assert route_features({"messages": [], "tools": [WEATHER], "tool_choice": {"type": "function"}}) == (
        "tools", "tool_choice=function")
    assert route_features({"messages": [], "tools": [], "tool_choice": "none"}) == ()
    assert route_features({"input": "hi", "instructions": "Be brief.", "previous_response_id": "resp_1"}) == (
        "instructions", "previous_response_id")
    assert route_features([1]) == ()
    record = ApiRequestRecord(client="127.0.0.1:5", method="POST", path="/v1/chat/completions", status=200,
                              seconds=1.25, prompt_tokens=10, completion_tokens=4, finish_reason="tool_calls",
                              features=("tools", "tool_choice=function"))
    assert record.line() == ("127.0.0.1:5 POST /v1/chat/completions 200 [tools, tool_choice=function] 10+4 tokens "
                             "tool_calls 1.25s")


def test_an_empty_tool_calls_list_is_no_calls() -> None:
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "tool_calls": []},
             {"role": "user", "content": "Bye"}]
    body, use = tool_request({"messages": turns, "tool_choice": "none"})
    assert use is None and body == {"messages": [turns[0], {"role": "assistant", "content": "Hello"}, turns[2]]}
