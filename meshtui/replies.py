"""The reply queue in front of the engine: one reply at a time, shared by the chat pane and the API.

The engine serves one reply at a time, so every reply (the API's and the chat pane's) takes its turn on one
`ReplyQueue`. It lives in the core so that neither front end imports the other: the TUI's chat pane and the
HTTP API (`meshtui/api.py`) both hold the same queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshtui import events as ev
from meshtui.errors import EngineError

_END = object()


@dataclass
class _Turn:
    source: str
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    abandoned: bool = False
    stopping: bool = False  # stop generating, but hand the consumer the reply up to its end
    started: bool = False
    cancelled: bool = False


class ReplySource(Protocol):
    """What the queue needs of a mesh (a `Mesh`, or a test's fake)."""

    @property
    def stream(self) -> Callable[..., AsyncIterator[ev.Event]]: ...

    def cancel(self) -> None: ...

    @property
    def ready(self) -> bool: ...


class ReplyQueue:
    """The queue in front of the engine, shared by the API and the chat pane: one reply at a time."""

    def __init__(self, mesh: ReplySource) -> None:
        self.mesh = mesh
        self.lock = asyncio.Lock()
        self.waiting = 0
        self._active: _Turn | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        """Whether a reply can start now. The one definition is the mesh's (`Mesh.ready`): the chat pane
        and the API both ask here rather than keep their own."""
        return self.mesh.ready

    @property
    def active_source(self) -> str | None:
        """Who the reply being generated is for ("api", "chat"), or None when the engine is idle."""
        return self._active.source if self._active else None

    async def stream(self, *, source: str = "chat", **params: Any) -> AsyncGenerator[ev.Event, None]:
        """`Mesh.stream(**params)` in turn.

        A separate task drives the mesh, so a consumer that leaves early (break, cancelled, client gone)
        cancels the reply and the task drains what the engine still sends: the next reply starts clean.
        """
        turn = _Turn(source)
        pump = asyncio.create_task(self._pump(turn, params))
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        ended = False
        try:
            while True:
                item = await turn.queue.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                assert isinstance(item, ev.Event)
                yield item
        finally:
            if not ended:
                turn.abandoned = True
                self._cancel(turn)

    async def _pump(self, turn: _Turn, params: dict[str, Any]) -> None:
        try:
            self.waiting += 1
            try:
                await self.lock.acquire()
            finally:
                self.waiting -= 1
            try:
                if turn.abandoned:
                    return
                self._active = turn
                async for event in self.mesh.stream(**params):
                    turn.started = turn.started or isinstance(event, ev.ReplyStarted)
                    if turn.abandoned or turn.stopping:
                        self._cancel(turn)
                    if not turn.abandoned:
                        turn.queue.put_nowait(event)
            finally:
                self._active = None
                self.lock.release()
        except asyncio.CancelledError:
            turn.queue.put_nowait(EngineError("the reply was interrupted"))
            raise
        except Exception as err:  # handed to the consumer, which raises it where it can be handled
            turn.queue.put_nowait(err)
        finally:
            turn.queue.put_nowait(_END)

    @contextlib.asynccontextmanager
    async def exclusive(self, source: str) -> AsyncIterator[None]:
        """Hold the engine between replies (a rejoin reloads it): replies asked meanwhile wait their turn."""
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        self._active = _Turn(source)
        try:
            yield
        finally:
            self._active = None
            self.lock.release()

    def _cancel(self, turn: _Turn) -> None:
        # Only once the engine has started this reply: a cancel sent before would be cleared by its start.
        if turn.started and not turn.cancelled and turn is self._active:
            turn.cancelled = True
            self.mesh.cancel()

    def stop(self, source: str) -> bool:
        """Stop the reply being generated if it is `source`'s; its consumer still gets it, cut, to the end."""
        turn = self._active
        if turn is None or turn.source != source:
            return False
        turn.stopping = True
        self._cancel(turn)
        return True

    def cancel(self, source: str | None = None) -> bool:
        """Cancel the reply being generated, if it is `source`'s (any source's when None)."""
        turn = self._active
        if turn is None or (source is not None and turn.source != source):
            return False
        turn.abandoned = True
        self._cancel(turn)
        return True

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait for replies still draining (after a cancel they end within a token); then stop them."""
        pumps = set(self._pumps)
        if not pumps:
            return
        _done, pending = await asyncio.wait(pumps, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
