"""A slow link for the lab: a TCP relay that holds every chunk for a one-way delay (plus random jitter).

Why: this kernel has no netem, and the lab's veth links have a round trip of tens of microseconds, while the
networks meshtui is for (Wi-Fi, 1 GbE between laptops) have 1-5 ms. Put a `SlowLink` in front of a lab host's
sshd and point the inventory at it: every byte of SSH, so every RPC frame, then crosses a link with real
round-trip time. Order is kept (a chunk is never delivered before the one read before it), as on TCP.

Plain stdlib, its own event loop in a daemon thread, so tests, benchmarks and manual runs can all use it.
Listens on the root namespace's 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass

_CHUNK = 256 * 1024


@dataclass(frozen=True)
class LinkShape:
    """One-way delay and jitter in seconds; the round trip is twice the delay plus the jitter drawn each way."""

    delay: float
    jitter: float = 0.0

    @property
    def rtt_ms(self) -> float:
        return 2000.0 * self.delay


class SlowLink:
    """127.0.0.1:<port> -> target, each direction delayed by `shape`."""

    def __init__(self, target: tuple[str, int], shape: LinkShape, *, seed: int | None = None) -> None:
        self.target = target
        self.shape = shape
        self.port = 0
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"slowlink-{target[0]}", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> int:
        self._thread.start()
        future: Future[int] = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(timeout=10)
        return self.port

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
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
                due = time.monotonic() + self.shape.delay + self._random.uniform(0.0, self.shape.jitter)
                last_due = max(last_due, due)  # in order, as TCP would
                queue.put_nowait((last_due, data))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):  # closing is best effort; the thread is a daemon
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> SlowLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inventory_through(inventory_toml: str, links: Mapping[str, SlowLink], known_hosts_in: str,
                      known_hosts_out: str) -> str:
    """Rewrite a lab inventory so the named hosts are reached through their links.

    Each host's `address`/`port` become the link's 127.0.0.1:<port>, and the host's key is recorded for that
    address in a copy of the lab's known_hosts (the key is the host's; only the route changed).
    """
    text = inventory_toml.replace(known_hosts_in, known_hosts_out)
    lines: list[str] = []
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("name = "):
            current = line.split("=", 1)[1].strip().strip('"')
        link = links.get(current) if current is not None else None
        if link is not None and line.startswith("address = "):
            line = 'address = "127.0.0.1"'
        if link is not None and line.startswith("port = "):
            line = f"port = {link.port}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def known_hosts_through(known_hosts: str, addresses: Mapping[str, str], links: Mapping[str, SlowLink]) -> str:
    """known_hosts text with each linked host's key also under `[127.0.0.1]:<link port>`."""
    extra = []
    for line in known_hosts.splitlines():
        pattern, _, key = line.partition(" ")
        for name, link in links.items():
            if pattern == addresses[name]:
                extra.append(f"[127.0.0.1]:{link.port} {key}")
    return known_hosts + "".join(f"{line}\n" for line in extra)


def start_links(targets: Iterable[tuple[str, str]], shape: LinkShape, seed: int = 0) -> dict[str, SlowLink]:
    """One started link per (name, address) to that address's sshd (port 22)."""
    links: dict[str, SlowLink] = {}
    for i, (name, address) in enumerate(targets):
        link = SlowLink((address, 22), shape, seed=seed + i)
        link.start()
        links[name] = link
    return links
