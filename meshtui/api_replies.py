"""One generation request answered: the mesh's reply events turned into an OpenAI response, whole or streamed.

The reply is asked of the `ReplyQueue` the chat pane shares; what the wire carries is decided in `api_openai`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from meshtui import events as ev
from meshtui.api_http import Exchange, end_events, start_events, write_event, write_json
from meshtui.api_openai import (
    ApiError,
    GenerationRequest,
    StopScanner,
    chat_chunk,
    chat_completion,
    finish_reason,
    text_completion,
    usage_chunk,
)
from meshtui.errors import EngineError, MeshError
from meshtui.replies import ReplyQueue

Failure = Callable[[MeshError, str], ApiError]  # a mesh error as the API reports it, given the param to blame


async def answer(gen: GenerationRequest, requests: ReplyQueue, writer: asyncio.StreamWriter, x: Exchange,
                 failure: Failure) -> None:
    """Generate the reply `gen` asks for and write it; leaving early (client gone) cancels the reply."""
    x.stream = gen.stream
    param = "messages" if gen.kind == "chat" else "prompt"
    seed = gen.seed if gen.seed is not None else secrets.randbelow(2**31)
    reply_id = ("chatcmpl-" if gen.kind == "chat" else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    scanner = StopScanner(gen.stop)
    x.asked = time.perf_counter()
    async with contextlib.aclosing(requests.stream(source="api", **gen.mesh_params(seed))) as events:
        try:
            started = await reply_started(events)
        except MeshError as err:
            raise failure(err, param) from err
        x.prompt_tokens = started.prompt_tokens
        async with contextlib.aclosing(texts_of(events, scanner, x)) as texts:
            if not gen.stream:
                try:
                    text = "".join([piece async for piece in texts])
                except MeshError as err:
                    raise failure(err, param) from err
                assert x.finish_reason is not None
                body = (chat_completion if gen.kind == "chat" else text_completion)(
                    reply_id, created, gen.model, text, x.finish_reason, x.usage())
                x.status = 200
                await write_json(writer, 200, body)
                return
            x.status = 200
            await start_events(writer)

            def chunk(text: str, reason: str | None = None) -> dict[str, Any]:
                if gen.kind == "completion":
                    return text_completion(reply_id, created, gen.model, text, reason)
                return chat_chunk(reply_id, created, gen.model, {"content": text} if text else {}, reason)

            if gen.kind == "chat":
                await write_event(writer, chat_chunk(reply_id, created, gen.model,
                                                     {"role": "assistant", "content": ""}))
            try:
                async for piece in texts:
                    await write_event(writer, chunk(piece))
            except MeshError as err:  # the status is sent already: the error goes in the stream
                refused = failure(err, param)
                x.detail = refused.message
                await write_event(writer, refused.body())
                return
    await write_event(writer, chunk("", x.finish_reason))
    if gen.include_usage:
        await write_event(writer, usage_chunk(gen, reply_id, created, x.usage()))
    await end_events(writer)



async def reply_started(events: AsyncIterator[ev.Event]) -> ev.ReplyStarted:
    async for event in events:
        if isinstance(event, ev.ReplyStarted):
            return event
    raise EngineError("the engine ended the reply before starting it")


async def texts_of(events: AsyncIterator[ev.Event], scanner: StopScanner,
                   x: Exchange) -> AsyncGenerator[str, None]:
    """The reply's text as it can be sent, cut at a stop sequence; counts tokens, sets the finish reason."""
    async for event in events:
        if isinstance(event, ev.TokenGenerated):
            x.completion_tokens += int(event.token_id >= 0)
            if x.first_token_seconds is None and event.token_id >= 0:
                x.first_token_seconds = time.perf_counter() - x.asked
            piece = scanner.feed(event.text)
            if piece:
                yield piece
            if scanner.stopped:
                x.finish_reason = finish_reason("cancelled", stopped_by_sequence=True)
                return
        elif isinstance(event, ev.ReplyFinished):
            x.finish_reason = finish_reason(event.stop_reason, stopped_by_sequence=False)
            tail = scanner.flush()
            if tail:
                yield tail
            return
    raise EngineError("the engine ended the reply without finishing it")

