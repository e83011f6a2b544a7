"""A slow link: a TCP relay that holds every chunk for a one-way delay (plus random jitter).

Why: this kernel has no netem, and a lab's links (veth, loopback) have a round trip of tens of microseconds,
while the networks meshtui is for (Wi-Fi, 1 GbE between laptops) have 1-5 ms. Put a relay in front of a host's
sshd and reach the host through it: every byte of SSH, so every RPC frame, then crosses a link with real
round-trip time. Order is kept (a chunk is never delivered before the one read before it), as on TCP.

Two ways to run it, one relay code:
- `SlowLink`: in this process, its own event loop in a daemon thread (the lab tests);
- `python -m meshtui.slowlink` / `LinkProcess`: a process of its own serving several links, whose delay can be
  changed while connections stay open (`meshtui bench --rtt`): no relay thread competes with the orchestrator
  for the GIL, and one mesh is measured at every round trip.
Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from meshtui.errors import MeshError

_CHUNK = 256 * 1024


@dataclass(frozen=True)
class LinkShape:
    """One-way delay and jitter in seconds; the round trip is twice the delay plus the jitter drawn each way."""

    delay: float
    jitter: float = 0.0

    @property
    def rtt_ms(self) -> float:
        return 2000.0 * self.delay

    @classmethod
    def for_rtt(cls, rtt_ms: float, jitter_ms: float = 0.0) -> LinkShape:
        """The shape whose round trip is `rtt_ms` (half of it each way)."""
        return cls(rtt_ms / 2000.0, jitter_ms / 1000.0)


def fine_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers keep sub-millisecond delays: epoll and poll wait in whole milliseconds
    (a 0.5 ms delay would take 1), select() in microseconds. A relay holds few sockets, so select() suits it."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


class Relay:
    """127.0.0.1:<port> -> target, each direction delayed by `shape`, served on the running event loop.

    `shape` may be replaced at any time: chunks read afterwards take the new delay (never overtaking earlier
    ones), on connections already open too.
    """

    def __init__(self, target: tuple[str, int], shape: LinkShape, *, seed: int | None = None) -> None:
        self.target = target
        self.shape = shape
        self.port = 0
        self._random = random.Random(seed)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1") -> int:
        self._server = await asyncio.start_server(self._serve, host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.target)
            except OSError:
                client_writer.close()
                return
            self._writers |= {client_writer, server_writer}
            await asyncio.gather(self._pump(client_reader, server_writer), self._pump(server_reader, client_writer),
                                 return_exceptions=True)
            for writer in (client_writer, server_writer):
                self._writers.discard(writer)
                writer.close()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read as fast as the sender writes; deliver each chunk `delay` (+ jitter) after it was read."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        last_due = 0.0
        try:
            while True:
                data = await reader.read(_CHUNK)
                shape = self.shape
                due = time.monotonic() + shape.delay + self._random.uniform(0.0, shape.jitter)
                last_due = max(last_due, due)  # in order, as TCP would
                queue.put_nowait((last_due, data))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        # Aborted transports end their pumps; a task cancelled instead would be logged by asyncio's streams.
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


class SlowLink:
    """A `Relay` on its own event loop in a daemon thread, for synchronous code (tests, manual runs)."""

    def __init__(self, target: tuple[str, int], shape: LinkShape, *, seed: int | None = None) -> None:
        self.relay = Relay(target, shape, seed=seed)
        self.port = 0
        self._loop = fine_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"slowlink-{target[0]}", daemon=True)

    @property
    def target(self) -> tuple[str, int]:
        return self.relay.target

    @property
    def shape(self) -> LinkShape:
        return self.relay.shape

    @shape.setter
    def shape(self, shape: LinkShape) -> None:
        self.relay.shape = shape  # one attribute, read once per chunk by the relay's thread

    def start(self) -> int:
        self._thread.start()
        future: Future[int] = asyncio.run_coroutine_threadsafe(self.relay.start(), self._loop)
        self.port = future.result(timeout=10)
        return self.port

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):  # closing is best effort; the thread is a daemon
                asyncio.run_coroutine_threadsafe(self.relay.close(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> SlowLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- a process of its own ----------------------------------------------------------------------------


def parse_target(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT` too) -> (host, port); ValueError names what is wrong."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def serve_process(targets: Sequence[tuple[str, int]], shape: LinkShape, seed: int) -> None:
    """Serve one relay per target; print their ports as one JSON line; then take commands on stdin.

    A command is a JSON line `{"rtt_ms": R, "jitter_ms": J}`, answered `{"event": "shaped", ...}` once every
    relay uses it. EOF on stdin (the parent gone) ends the process.
    """
    relays = [Relay(target, shape, seed=seed + i) for i, target in enumerate(targets)]
    ports = [await relay.start() for relay in relays]
    print(json.dumps({"event": "ready", "ports": ports, "rtt_ms": shape.rtt_ms}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            try:
                command = json.loads(line)
                new = LinkShape.for_rtt(float(command["rtt_ms"]), float(command.get("jitter_ms", 0.0)))
            except (ValueError, KeyError, TypeError) as err:
                print(json.dumps({"event": "error", "message": f"bad command {line.strip()!r}: {err}"}), flush=True)
                continue
            for relay in relays:
                relay.shape = new
            print(json.dumps({"event": "shaped", "rtt_ms": new.rtt_ms, "jitter_ms": 1000.0 * new.jitter}),
                  flush=True)
    finally:
        await asyncio.gather(*(relay.close() for relay in relays))


class LinkProcess:
    """`python -m meshtui.slowlink` as a child: one relay per target, the round trip changeable at run time."""

    def __init__(self, targets: Sequence[tuple[str, int]], rtt_ms: float = 0.0, jitter_ms: float = 0.0,
                 seed: int = 0) -> None:
        self.targets = list(targets)
        self.rtt_ms = rtt_ms
        self.jitter_ms = jitter_ms
        self.seed = seed
        self.ports: list[int] = []
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> list[int]:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "meshtui.slowlink", "--rtt-ms", str(self.rtt_ms), "--jitter-ms",
             str(self.jitter_ms), "--seed", str(self.seed), *(f"{h}:{p}" for h, p in self.targets)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        ready = self._answer()
        if ready.get("event") != "ready":
            self.close()
            raise MeshError(f"the slow-link relay did not start: {ready}")
        self.ports = [int(p) for p in ready["ports"]]
        return self.ports

    def _answer(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        try:
            answer = json.loads(line)
        except ValueError:
            return {"event": "exited", "status": self._proc.poll(), "line": line[:200]}
        return answer if isinstance(answer, dict) else {"event": "unparsable", "line": line[:200]}

    def set_rtt(self, rtt_ms: float, jitter_ms: float = 0.0) -> None:
        """Every link's round trip from now on (connections stay open)."""
        if self._proc is None or self._proc.stdin is None:
            raise MeshError("the slow-link relay is not running")
        self._proc.stdin.write(json.dumps({"rtt_ms": rtt_ms, "jitter_ms": jitter_ms}) + "\n")
        self._proc.stdin.flush()
        answer = self._answer()
        if answer.get("event") != "shaped":
            raise MeshError(f"the slow-link relay did not take rtt {rtt_ms} ms: {answer}")
        self.rtt_ms, self.jitter_ms = rtt_ms, jitter_ms

    def close(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    def __enter__(self) -> LinkProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshtui.slowlink",
                                     description="TCP relays on 127.0.0.1 adding a round trip to each target")
    parser.add_argument("targets", nargs="+", metavar="HOST:PORT")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round trip added (half each way)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="random extra delay each way, 0 to this")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        targets = [parse_target(t) for t in args.targets]
    except ValueError as err:
        parser.error(str(err))
    loop = fine_event_loop()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            loop.run_until_complete(serve_process(targets, LinkShape.for_rtt(args.rtt_ms, args.jitter_ms), args.seed))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
