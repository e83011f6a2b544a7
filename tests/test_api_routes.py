"""Tools, the Responses API and embeddings on a real mesh (the embedded lab), called with the official `openai`
client: what agent clients send."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pydantic
import pytest
from test_api import KEY, SLUG, Served, http, served  # noqa: F401  (the module's mesh, served once)

from meshtui.api_http import ApiRequestRecord

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

async def record_of(mesh: Served, path: str, after: int) -> ApiRequestRecord:
    """The log record of the first request to `path` after the first `after` records (it is logged once its
    connection closes, just after the client has its answer)."""

    async def found() -> ApiRequestRecord:
        while True:
            for record in mesh.records[after:]:
                if record.path == path:
                    return record
            await asyncio.sleep(0.01)

    return await asyncio.wait_for(found(), 30)


QUESTION = [{"role": "user", "content": "Say hello in one short sentence."}]


# -- /v1/responses ------------------------------------------------------------------------------------------


async def test_responses_answer_text_input_like_the_chat_route(served: Served) -> None:  # noqa: F811
    before = len(served.records)
    async with served.client() as client:
        chat = await client.chat.completions.create(model=SLUG, messages=[
            {"role": "system", "content": "You are terse."}, *QUESTION], max_tokens=12, temperature=0)
        response = await client.responses.create(model="meshtui", input=QUESTION[0]["content"],
                                                 instructions="You are terse.", max_output_tokens=12,
                                                 temperature=0)
    assert response.output_text == chat.choices[0].message.content and response.output_text
    assert response.object == "response" and response.model == SLUG and response.id.startswith("resp_")
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert response.instructions == "You are terse." and response.max_output_tokens == 12
    assert response.usage is not None and chat.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                           chat.usage.completion_tokens)
    record = await record_of(served, "/v1/responses", before)
    assert (record.method, record.status) == ("POST", 200)


async def test_responses_stream_the_event_sequence_with_the_same_text(served: Served) -> None:  # noqa: F811
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}]
    async with served.client() as client:
        whole = await client.responses.create(input=messages, max_output_tokens=10, temperature=0)  # type: ignore[arg-type]
        stream = await client.responses.create(input=messages, max_output_tokens=10, temperature=0,  # type: ignore[arg-type]
                                               stream=True)
        events = [event async for event in stream]
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.id == events[0].response.id  # type: ignore[union-attr]


async def test_a_follow_up_continues_the_stored_response(served: Served) -> None:  # noqa: F811
    async with served.client() as client:
        first = await client.responses.create(input="My name is Ada. Remember it.", max_output_tokens=8,
                                              temperature=0)
        second = await client.responses.create(input="What is my name?", previous_response_id=first.id,
                                               max_output_tokens=8, temperature=0)
        chat = await client.chat.completions.create(model=SLUG, messages=[
            {"role": "user", "content": "My name is Ada. Remember it."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"}], max_tokens=8, temperature=0)
        assert second.previous_response_id == first.id
        assert second.output_text == chat.choices[0].message.content
        assert second.usage is not None and chat.usage is not None
        assert second.usage.input_tokens == chat.usage.prompt_tokens
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.responses.create(input="Hi", previous_response_id="resp_nope", max_output_tokens=2)
    assert unknown.value.code == "previous_response_not_found" and unknown.value.param == "previous_response_id"
    assert unknown.value.message.endswith("Previous response with id 'resp_nope' not found.")


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"text": {"format": {"type": "json_object"}}}, "text"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
])
async def test_responses_refuse_what_they_do_not_serve_by_name(served: Served, extra: dict[str, Any],  # noqa: F811
                                                               param: str) -> None:
    status, _, body = await http(served.server.port, "POST", "/v1/responses",
                                 json.dumps({"input": "Hi", **extra}).encode())
    assert status == 400 and body["error"]["param"] == param and param in body["error"]["message"]


async def test_embeddings_are_refused_saying_why(served: Served) -> None:  # noqa: F811
    async with served.client() as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.embeddings.create(model=SLUG, input="hello")
    assert refused.value.code == "embeddings_not_supported"
    assert "Embeddings are not served: the engine holds one llama.cpp context" in refused.value.message


# -- tools --------------------------------------------------------------------------------------------------


class Weather(pydantic.BaseModel):
    city: str
    days: int


WEATHER_TOOL = openai.pydantic_function_tool(Weather, name="get_weather", description="The weather forecast")
ASK_WEATHER = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


async def test_a_named_tool_choice_yields_a_call_that_validates(served: Served) -> None:  # noqa: F811
    before = len(served.records)
    async with served.client() as client:
        for seed in (1, 2, 3):
            reply = await client.chat.completions.create(
                model=SLUG, messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice=NAMED,  # type: ignore[list-item,arg-type]
                max_tokens=200, temperature=0.8, seed=seed)
            choice = reply.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            calls = choice.message.tool_calls or []
            assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
            assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
            Weather.model_validate_json(calls[0].function.arguments)  # type: ignore[union-attr]
    record = await record_of(served, "/v1/chat/completions", before)
    assert " 200 [tools, tool_choice=function] " in record.line()


async def test_streamed_tool_call_deltas_assemble_into_the_same_call(served: Served) -> None:  # noqa: F811
    params: dict[str, Any] = {"model": SLUG, "messages": ASK_WEATHER, "tools": [WEATHER_TOOL],
                              "tool_choice": "required", "max_tokens": 200, "temperature": 0}
    async with served.client() as client:
        whole = await client.chat.completions.create(**params)
        stream = await client.chat.completions.create(**params, stream=True)
        chunks = [chunk async for chunk in stream]
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function.name if delta.function else None) or ""
            call["arguments"] += (delta.function.arguments if delta.function else None) or ""
    expected = whole.choices[0].message.tool_calls or []
    assert expected and [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in expected]  # type: ignore[union-attr]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "tool_calls"


async def test_a_tool_result_in_messages_reaches_the_model_and_auto_replies_stream_alike(
        served: Served) -> None:  # noqa: F811
    """SmolLM2-135M answers a tool result under `auto` by calling the tool again (greedy, and 8 of 8 seeds at
    temperature 1, in llama.cpp's generic format too): the final text answer is asked with tool_choice="none"."""
    arguments = json.dumps({"city": "Paris", "days": 3})
    messages: list[Any] = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C, all three days."},
    ]
    params: dict[str, Any] = {"model": SLUG, "tools": [WEATHER_TOOL], "max_tokens": 120, "temperature": 0}
    async with served.client() as client:
        asked = await client.chat.completions.create(messages=ASK_WEATHER, **params, tool_choice="none")
        answered = await client.chat.completions.create(messages=messages, **params, tool_choice="none")
        auto = await client.chat.completions.create(messages=messages, **params, tool_choice="auto")
        stream = await client.chat.completions.create(messages=messages, **params, tool_choice="auto",
                                                      stream=True)
        chunks = [c async for c in stream if c.choices]
    assert asked.usage is not None and answered.usage is not None
    assert answered.usage.prompt_tokens > asked.usage.prompt_tokens + 20  # the call and its result are in it
    final = answered.choices[0]
    assert final.message.tool_calls is None and final.message.content and final.finish_reason in ("stop", "length")
    choice = auto.choices[0]
    for call in choice.message.tool_calls or []:
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        Weather.model_validate_json(call.function.arguments)  # type: ignore[union-attr]
    assert bool(choice.message.tool_calls) != bool(choice.message.content)  # calls or a text answer, not both
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks)
    streamed_calls: dict[int, str] = {}
    for c in chunks:
        for d in c.choices[0].delta.tool_calls or []:
            streamed_calls[d.index] = streamed_calls.get(d.index, "") + ((d.function and d.function.arguments) or "")
    assert streamed_text == (choice.message.content or "")
    assert list(streamed_calls.values()) == [c.function.arguments  # type: ignore[union-attr]
                                             for c in choice.message.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


async def test_an_invalid_tools_entry_is_a_400_naming_it(served: Served) -> None:  # noqa: F811
    bad = {"type": "function", "function": {"name": "get weather"}}
    async with served.client() as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model=SLUG, messages=ASK_WEATHER, tools=[WEATHER_TOOL, bad])  # type: ignore[list-item]
    assert refused.value.param == "tools[1].function.name"
    assert "tools[1].function.name must be 1 to 64 letters" in refused.value.message
