"""One reply's text as the routes built on it (tools, the Responses API) send it: started, then pieces cut at a
stop sequence, counted into the request's `Exchange`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from meshtui import events as ev
from meshtui.api_http import Exchange
from meshtui.api_openai import finish_reason
from meshtui.api_replies import Failure
from meshtui.engine.stops import StopText
from meshtui.errors import EngineError, MeshError
from meshtui.replies import ReplyQueue


async def reply_started(events: AsyncIterator[ev.Event]) -> ev.ReplyStarted:
    async for event in events:
        if isinstance(event, ev.ReplyStarted):
            return event
    raise EngineError("the engine ended the reply before starting it")


async def texts_of(events: AsyncIterator[ev.Event], scanner: StopText,
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


@contextlib.asynccontextmanager
async def reply_texts(requests: ReplyQueue, params: dict[str, Any], stops: tuple[str, ...], x: Exchange,
                      failure: Failure, param: str) -> AsyncIterator[AsyncIterator[str]]:
    """Ask the mesh for one reply and hand over its text as `texts_of` cuts it; a reply that cannot start is the
    route's error for `param`."""
    x.asked = time.perf_counter()
    async with contextlib.aclosing(requests.stream(source="api", **params)) as events:
        try:
            started = await reply_started(events)
        except MeshError as err:
            raise failure(err, param) from err
        x.prompt_tokens = started.prompt_tokens
        async with contextlib.aclosing(texts_of(events, StopText(stops), x)) as texts:
            yield texts
