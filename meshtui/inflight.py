"""The replies in flight on one engine, and the one change of engine at a time (a recovery, a rejoin).

Several replies stream at once, each its own sequence in the engine. When the engine dies under them, the first
reply to notice starts the recovery; the others wait for that same recovery, and then every reply resumes where
it stopped. A rejoin reloads the engine, so it runs only while no reply is in flight; replies asked meanwhile
wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


class InFlight:
    def __init__(self) -> None:
        self.replies: dict[int, str] = {}  # request id -> whose it is ("chat", "api", ...)
        self.started = 0  # replies started so far: a reply that saw none start beside it was decoded alone
        self._change: asyncio.Task[None] | None = None

    @property
    def changing(self) -> bool:
        """A recovery or a rejoin is changing the engine now."""
        return self._change is not None and not self._change.done()

    def begin(self, request_id: int, source: str) -> None:
        self.replies[request_id] = source
        self.started += 1

    def end(self, request_id: int) -> None:
        self.replies.pop(request_id, None)

    def alone(self, started: int) -> bool:
        """Whether the only reply in flight is one that counted `started` when it began, and none started since
        (so the stages' meters hold its decode steps alone)."""
        return len(self.replies) == 1 and self.started == started

    def change(self, work: Coroutine[Any, Any, None]) -> None:
        """Start changing the engine (unless a change is under way already: `work` is then dropped)."""
        if self.changing:
            work.close()
            return
        self._change = asyncio.create_task(work)
        self._change.add_done_callback(_retrieve)

    async def settled(self) -> None:
        """Wait for a change under way; its failure is raised to every reply that waits for it."""
        task = self._change
        if task is not None and not task.done():
            await asyncio.shield(task)

    async def close(self) -> None:
        task = self._change
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # stopping: its outcome no longer matters
                await task


def _retrieve(task: asyncio.Task[None]) -> None:
    """The replies waiting for a change are told its failure; with none waiting, asyncio must not warn of it."""
    if not task.cancelled():
        task.exception()
