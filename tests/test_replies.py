"""The reply queue (meshtui/replies.py): the one readiness, and turns that include a rejoin's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from meshtui import events as ev
from meshtui.api import ApiServer
from meshtui.replies import ReplyQueue


class ScriptedSource:
    """A mesh's surface for the queue: a fixed reply, and a readiness the test sets."""

    def __init__(self) -> None:
        self.ready = False
        self.started: list[str] = []

    async def stream(self, **params: Any) -> AsyncIterator[ev.Event]:
        self.started.append(params["prompt"])
        yield ev.ReplyStarted(1, 3)
        yield ev.TokenGenerated(1, 0, 7, "ok")
        yield ev.ReplyFinished(1, "ok", (7,), 0.1, 10.0, "stop")

    def cancel(self) -> None:
        pass


def test_ready_is_the_meshs_for_the_queue_and_the_api_alike() -> None:
    source = ScriptedSource()
    queue = ReplyQueue(source)
    api = ApiServer(source, port=0, requests=queue)  # type: ignore[arg-type]
    assert (queue.ready, api.ready()) == (False, False)
    source.ready = True
    assert (queue.ready, api.ready()) == (True, True)


async def test_a_reply_asked_during_a_rejoin_waits_for_its_end() -> None:
    source = ScriptedSource()
    queue = ReplyQueue(source)
    texts: list[str] = []

    async def reply() -> None:
        async for event in queue.stream(source="chat", prompt="hi"):
            if isinstance(event, ev.TokenGenerated):
                texts.append(event.text)

    async with queue.exclusive("rejoin"):
        assert queue.active_source == "rejoin"
        task = asyncio.create_task(reply())
        for _ in range(20):
            await asyncio.sleep(0)
        assert queue.waiting == 1 and source.started == []  # held while the engine is reloaded
    await asyncio.wait_for(task, 5)
    assert source.started == ["hi"] and texts == ["ok"]
    assert queue.active_source is None and queue.waiting == 0
