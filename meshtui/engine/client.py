"""The orchestrator's side of the engine process: start it, load, stream tokens, notice when it dies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable

from meshtui.engine import protocol as wire
from meshtui.errors import EngineError
from meshtui.procs import wait_or_kill
from meshtui.text import printable


class ContextOverflow(EngineError):
    """The prompt does not fit in the context: the numbers are kept, for whoever reports it."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        super().__init__(f"prompt is {prompt_tokens} tokens; the context holds {context}")
        self.prompt_tokens = prompt_tokens
        self.context = context


class EngineDied(EngineError):
    """The engine process exited: usually ggml aborting because a stage went away."""


class EngineProcess:
    def __init__(self, on_log: Callable[[str], None] = lambda line: None) -> None:
        self.on_log = on_log
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self._events: asyncio.Queue[wire.Event | None] = asyncio.Queue()  # events of no request (hello, load)
        self._replies: dict[int, asyncio.Queue[wire.Event | None]] = {}  # request id -> its events
        self._ended = False  # the engine's output ended: every reply, now or later, learns it died
        self._tasks: list[asyncio.Task[None]] = []
        self.pid = 0

    async def start(self) -> None:
        # The engine talks to no host over SSH: it gets no way to the user's ssh-agent.
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID")}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshtui.engine.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, limit=16 * 1024 * 1024, start_new_session=True,
        )
        self.pid = self.proc.pid
        self._tasks = [asyncio.create_task(self._read_events()), asyncio.create_task(self._read_stderr())]
        hello = await self._next_event(timeout=120)
        if not isinstance(hello, wire.Hello):
            raise EngineError(f"engine said {hello!r} instead of hello")

    async def _read_events(self) -> None:
        assert self.proc and self.proc.stdout
        async for raw in self.proc.stdout:
            try:
                event = wire.decode_event(raw)
            except ValueError as err:  # not the protocol: say so, and keep reading
                self.on_log(f"engine: unparsable line ({err})")
                continue
            request_id = getattr(event, "id", None)
            # Several replies can be under way: each reads its own events, by request id.
            queue = self._replies.get(request_id, self._events) if isinstance(request_id, int) else self._events
            queue.put_nowait(event)
        self._ended = True
        self._events.put_nowait(None)
        for queue in self._replies.values():
            queue.put_nowait(None)

    async def _read_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        async for raw in self.proc.stderr:
            line = printable(raw.decode("utf-8", errors="replace").rstrip())  # llama.cpp quotes the model's strings
            if line:
                self.stderr_tail.append(line)
                self.on_log(line)

    def _death_reason(self) -> str:
        code = self.proc.returncode if self.proc else None
        interesting = [line for line in self.stderr_tail if "RPC" in line or "error" in line.lower()]
        detail = (interesting or list(self.stderr_tail) or ["no output"])[-1]
        return f"engine exited (status {code}): {detail}"

    async def _next_event(self, timeout: float | None = None,
                          queue: asyncio.Queue[wire.Event | None] | None = None) -> wire.Event:
        queue = self._events if queue is None else queue
        try:
            event = await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError as err:
            raise EngineError(f"engine did not answer within {timeout:.0f}s") from err
        if event is None:
            queue.put_nowait(None)  # keep reporting death to later callers
            if self.proc:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 5)
                for task in self._tasks[1:]:
                    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(asyncio.shield(task), 1)
            raise EngineDied(self._death_reason())
        return event

    def send(self, command: wire.Command) -> None:
        if not self.proc or not self.proc.stdin or self.proc.stdin.is_closing():
            raise EngineDied("engine is not running")
        self.proc.stdin.write(wire.encode(command).encode())

    async def load(self, command: wire.Load) -> wire.Loaded:
        self.send(command)
        event = await self._next_event(timeout=None)
        if isinstance(event, wire.Failed):
            raise EngineError(f"model load failed: {event.message}")
        if not isinstance(event, wire.Loaded):
            raise EngineError(f"unexpected engine event during load: {event!r}")
        return event

    async def calibrate(self, positions: int) -> tuple[float, ...]:
        """What steps of 1 to `positions` positions take on this mesh (ms; empty if one failed); every later
        request's drafting policy follows their shape. While no request is in flight."""
        self.send(wire.Calibrate(positions))
        event = await self._next_event(timeout=None)
        if isinstance(event, wire.Failed):
            raise EngineError(f"calibration failed: {event.message}")
        if not isinstance(event, wire.Calibrated):
            raise EngineError(f"unexpected engine event during calibration: {event!r}")
        return event.step_ms

    async def generate(self, command: wire.Generate) -> AsyncIterator[wire.ReplyEvent]:
        """Yields the engine's events for one request: Started, Token..., then Done (or raises).

        Several may run at once (the engine decodes them together): each reads only its own request's events.
        """
        if command.id in self._replies:
            raise EngineError(f"request {command.id} is under way already")
        queue: asyncio.Queue[wire.Event | None] = asyncio.Queue()
        if self._ended:
            queue.put_nowait(None)
        self._replies[command.id] = queue
        try:
            self.send(command)
            while True:
                event = await self._next_event(queue=queue)
                if isinstance(event, wire.Failed):
                    if event.context is not None and event.prompt_tokens is not None:
                        raise ContextOverflow(event.prompt_tokens, event.context)
                    raise EngineError(event.message)
                if not isinstance(event, wire.ReplyEvent):
                    raise EngineError(f"unexpected engine event during a reply: {event!r}")
                if isinstance(event, wire.Done):
                    del self._replies[command.id]  # the id is free again, even if nobody reads further
                    yield event
                    return
                yield event
        finally:
            if self._replies.get(command.id) is queue:  # a later request may reuse the id once Done came
                del self._replies[command.id]

    def cancel(self, request_id: int | None = None) -> None:
        """Stop a reply: the one under way, or (with an id) that request even if it has not started yet."""
        with contextlib.suppress(EngineError, OSError, RuntimeError):
            self.send(wire.Cancel(request_id))

    def kill(self) -> None:
        """Stop the engine at once (it is blocked inside ggml on a lost stage); readers then see it die."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def close(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(EngineError, OSError, RuntimeError):
                self.send(wire.Shutdown())
            await wait_or_kill(self.proc, timeout)
        for task in self._tasks:
            task.cancel()
        self._tasks = []
