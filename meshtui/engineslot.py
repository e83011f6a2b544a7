"""The mesh's one engine process at a time: started for each load, stopped before the next, watched between.

ggml aborts the process that holds the model when a stage goes away, so the engine can exit by itself, even
between replies; that is told as `EngineStopped`, and readiness is read from the events (`state.is_ready`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from meshtui import events as ev
from meshtui.engine.client import EngineProcess
from meshtui.errors import MeshError


class EngineSlot:
    def __init__(self, emit: ev.Listener, on_log: Callable[[str], None]) -> None:
        self.emit = emit
        self.on_log = on_log
        self.engine: EngineProcess | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> EngineProcess:
        """A fresh engine process in the slot (stop the previous one first), watched until it exits."""
        engine = self.engine = EngineProcess(on_log=self.on_log)
        await engine.start()
        self._watch = asyncio.create_task(self._watch_exit(engine))
        return engine

    async def _watch_exit(self, engine: EngineProcess) -> None:
        if engine.proc is None:
            return
        code = await engine.proc.wait()
        if engine is self.engine:
            self.emit(ev.EngineStopped(f"engine exited (status {code})"))

    async def stop(self, reason: str) -> None:
        """Empty the slot, tell why, and close the engine that was in it."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        self.emit(ev.EngineStopped(reason))
        with contextlib.suppress(MeshError, OSError):  # stopping it: how it ends no longer matters
            await engine.close()

    def kill(self) -> None:
        """The step watchdog declared a stage lost: end the engine now, so the replies see it die."""
        if self.engine is not None:
            self.engine.kill()

    async def close(self, reason: str) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.stop(reason)
