"""The reply queue in front of the engine: up to N replies in flight, shared by the chat pane and the API.

The engine decodes up to `Mesh.parallel` sequences together, so that many replies (the API's and the chat
pane's) stream at once; more wait in arrival order. It lives in the core so that neither front end imports the
other: the TUI's chat pane and the HTTP API (`meshtui/api.py`) both hold the same queue.
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


@dataclass(eq=False)
class _Turn:
    source: str
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    abandoned: bool = False
    stopping: bool = False  # stop generating, but hand the consumer the reply up to its end
    request_id: int | None = None  # the mesh's id for it, once the engine started it
    cancelled: bool = False
    exclusive: bool = False  # holds the engine alone (a rejoin reloads it)


class ReplySource(Protocol):
    """What the queue needs of a mesh (a `Mesh`, or a test's fake)."""

    @property
    def stream(self) -> Callable[..., AsyncIterator[ev.Event]]: ...

    def cancel(self, request_id: int | None = None) -> None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def parallel(self) -> int: ...


class ReplyQueue:
    """The queue in front of the engine, shared by the API and the chat pane: up to `slots` replies at once.

    Replies are admitted in arrival order; a hold of the whole engine (`exclusive`) waits its turn like a reply
    and, once admitted, keeps every later reply waiting until it ends.
    """

    def __init__(self, mesh: ReplySource, slots: int | None = None) -> None:
        """`slots`: replies in flight at once; by default the mesh's `parallel` (the sequences its plan holds)."""
        slots = mesh.parallel if slots is None else slots
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.mesh = mesh
        self.slots = slots
        self._changed = asyncio.Condition()
        self._line: list[_Turn] = []  # waiting, in arrival order
        self._active: list[_Turn] = []  # in flight, in the order they were admitted
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        """Whether a reply can start now. The one definition is the mesh's (`Mesh.ready`): the chat pane
        and the API both ask here rather than keep their own."""
        return self.mesh.ready

    @property
    def waiting(self) -> int:
        """Replies (and holds) asked for and not yet admitted."""
        return len(self._line)

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Whose replies are being generated now ("api", "chat", ...), in the order they were admitted."""
        return tuple(turn.source for turn in self._active)

    @property
    def active_source(self) -> str | None:
        """Who the first reply in flight is for, or None when the engine is idle."""
        return self._active[0].source if self._active else None

    async def stream(self, *, source: str = "chat", **params: Any) -> AsyncGenerator[ev.Event, None]:
        """`Mesh.stream(**params)` once admitted.

        A separate task drives the mesh, so a consumer that leaves early (break, cancelled, client gone)
        cancels its reply and the task drains what the engine still sends for it; no other reply is touched.
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
            await self._enter(turn)
            try:
                if turn.abandoned:
                    return
                async for event in self.mesh.stream(source=turn.source, **params):
                    if isinstance(event, ev.ReplyStarted) and turn.request_id is None:
                        turn.request_id = event.request_id
                    if turn.abandoned or turn.stopping:
                        self._cancel(turn)
                    if not turn.abandoned:
                        turn.queue.put_nowait(event)
            finally:
                await self._leave(turn)
        except asyncio.CancelledError:
            turn.queue.put_nowait(EngineError("the reply was interrupted"))
            raise
        except Exception as err:  # handed to the consumer, which raises it where it can be handled
            turn.queue.put_nowait(err)
        finally:
            turn.queue.put_nowait(_END)

    def _admits(self, turn: _Turn) -> bool:
        if not self._line or self._line[0] is not turn:
            return False  # arrival order: only the first in line may go
        if turn.exclusive:
            return not self._active
        return len(self._active) < self.slots and not any(t.exclusive for t in self._active)

    async def _enter(self, turn: _Turn) -> None:
        async with self._changed:
            self._line.append(turn)
            try:
                await self._changed.wait_for(lambda: self._admits(turn))
            finally:
                self._line.remove(turn)
                self._changed.notify_all()  # the next in line may be admitted too
            self._active.append(turn)

    async def _leave(self, turn: _Turn) -> None:
        # Shielded: a pump cancelled at close still gives its place back.
        async def leave() -> None:
            async with self._changed:
                self._active.remove(turn)
                self._changed.notify_all()

        await asyncio.shield(leave())

    @contextlib.asynccontextmanager
    async def exclusive(self, source: str) -> AsyncIterator[None]:
        """Hold the engine between replies (a rejoin reloads it): replies asked meanwhile wait their turn."""
        turn = _Turn(source, exclusive=True)
        await self._enter(turn)
        try:
            yield
        finally:
            await self._leave(turn)

    def _cancel(self, turn: _Turn) -> None:
        # Only once the engine has started this reply (its id is known then), and only while it is in flight.
        if turn.request_id is not None and not turn.cancelled and turn in self._active:
            turn.cancelled = True
            self.mesh.cancel(turn.request_id)

    def _turns_of(self, source: str | None) -> list[_Turn]:
        return [t for t in self._active if not t.exclusive and (source is None or t.source == source)]

    def stop(self, source: str) -> bool:
        """Stop the replies being generated for `source`; their consumers still get them, cut, to the end."""
        turns = self._turns_of(source)
        for turn in turns:
            turn.stopping = True
            self._cancel(turn)
        return bool(turns)

    def cancel(self, source: str | None = None) -> bool:
        """Cancel the replies being generated for `source` (every one when None)."""
        turns = self._turns_of(source)
        for turn in turns:
            turn.abandoned = True
            self._cancel(turn)
        return bool(turns)

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
