"""The reply queue (meshtui/replies.py): the one readiness, and turns that include a rejoin's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from meshtui import events as ev
from meshtui.api import ApiServer
from meshtui.replies import ReplyQueue


class ScriptedSource:
    """A mesh's surface for the queue: a fixed reply, and a readiness the test sets."""

    def __init__(self) -> None:
        self.ready = False
        self.parallel = 1
        self.started: list[str] = []

    async def stream(self, **params: Any) -> AsyncIterator[ev.Event]:
        self.started.append(params["prompt"])
        yield ev.ReplyStarted(1, 3)
        yield ev.TokenGenerated(1, 0, 7, "ok")
        yield ev.ReplyFinished(1, "ok", (7,), 0.1, 10.0, "stop")

    def cancel(self, request_id: int | None = None) -> None:
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


class ConcurrentSource:
    """A mesh that streams several replies at once: each token waits for the test's go, cancel is by id."""

    def __init__(self, tokens: int = 3) -> None:
        self.ready = True
        self.tokens = tokens
        self.running: list[str] = []
        self.most_at_once = 0
        self.cancelled: list[int] = []
        self.go = asyncio.Event()
        self._ids = 0

    async def stream(self, **params: Any) -> AsyncIterator[ev.Event]:
        prompt = params["prompt"]
        self._ids += 1
        rid = self._ids
        self.running.append(prompt)
        self.most_at_once = max(self.most_at_once, len(self.running))
        try:
            yield ev.ReplyStarted(rid, 3)
            text = ""
            stop = "length"
            for i in range(self.tokens):
                await self.go.wait()
                if rid in self.cancelled:
                    stop = "cancelled"
                    break
                text += f"{prompt}{i} "
                yield ev.TokenGenerated(rid, i, i, f"{prompt}{i} ")
            yield ev.ReplyFinished(rid, text, tuple(range(len(text.split()))), 0.1, 10.0, stop)
        finally:
            self.running.remove(prompt)

    def cancel(self, request_id: int | None = None) -> None:
        assert request_id is not None  # the queue always names the reply it cancels
        self.cancelled.append(request_id)


async def _collect(queue: ReplyQueue, prompt: str, source: str = "api") -> tuple[str, str]:
    text, stop = "", ""
    async for event in queue.stream(source=source, prompt=prompt):
        if isinstance(event, ev.TokenGenerated):
            text += event.text
        elif isinstance(event, ev.ReplyFinished):
            stop = event.stop_reason
    return text, stop


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0)


async def test_up_to_slots_replies_stream_at_once_and_the_rest_wait_in_order() -> None:
    source = ConcurrentSource()
    queue = ReplyQueue(source, slots=2)
    tasks = [asyncio.create_task(_collect(queue, p)) for p in ("a", "b", "c")]
    await _until(lambda: len(source.running) == 2)
    assert source.running == ["a", "b"] and queue.waiting == 1 and queue.in_flight == ("api", "api")
    source.go.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert results == [("a0 a1 a2 ", "length"), ("b0 b1 b2 ", "length"), ("c0 c1 c2 ", "length")]
    assert source.most_at_once == 2 and queue.in_flight == () and queue.waiting == 0


async def test_leaving_one_reply_cancels_it_alone() -> None:
    source = ConcurrentSource(tokens=4)
    queue = ReplyQueue(source, slots=3)
    first = asyncio.create_task(_collect(queue, "a"))
    second = asyncio.create_task(_collect(queue, "b", source="chat"))

    async def leave_after_one_token() -> None:
        async with contextlib.aclosing(queue.stream(source="api", prompt="x")) as events:
            async for event in events:
                if isinstance(event, ev.TokenGenerated):
                    return

    source.go.set()
    await asyncio.wait_for(leave_after_one_token(), 5)
    assert source.cancelled == [3]  # "x" was the third reply the mesh started
    assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [("a0 a1 a2 a3 ", "length"),
                                                                       ("b0 b1 b2 b3 ", "length")]
    await queue.settle()
    assert queue.in_flight == ()


async def test_stop_and_cancel_touch_only_their_sources_replies() -> None:
    source = ConcurrentSource()
    queue = ReplyQueue(source, slots=2)
    api = asyncio.create_task(_collect(queue, "a", source="api"))
    chat = asyncio.create_task(_collect(queue, "c", source="chat"))
    await _until(lambda: len(source.running) == 2)
    await asyncio.sleep(0)  # both started: their ids are known
    assert queue.stop("chat") and not queue.stop("rejoin")
    source.go.set()
    assert await asyncio.wait_for(api, 5) == ("a0 a1 a2 ", "length")
    assert await asyncio.wait_for(chat, 5) == ("", "cancelled")  # stopped: its consumer still gets the end
    assert source.cancelled == [2]


async def test_a_hold_of_the_engine_waits_for_the_replies_in_flight_and_holds_later_ones() -> None:
    source = ConcurrentSource(tokens=1)
    queue = ReplyQueue(source, slots=4)
    early = asyncio.create_task(_collect(queue, "a"))
    await _until(lambda: source.running == ["a"])
    held = asyncio.Event()

    async def rejoin() -> None:
        async with queue.exclusive("rejoin"):
            held.set()
            await asyncio.sleep(0.01)
            assert source.running == []

    hold = asyncio.create_task(rejoin())
    await _until(lambda: queue.waiting == 1)
    late = asyncio.create_task(_collect(queue, "b"))
    await _until(lambda: queue.waiting == 2)
    assert not held.is_set()  # the reply in flight goes on; the hold waits for it
    source.go.set()
    await asyncio.wait_for(hold, 5)
    assert await asyncio.wait_for(asyncio.gather(early, late), 5) == [("a0 ", "length"), ("b0 ", "length")]
