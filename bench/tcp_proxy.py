#!/usr/bin/env python3
"""A plain TCP forwarder on the head, for splitting the tunnels' cost: the extra hop versus SSH itself.

Forwards 127.0.0.1:LOCAL_PORT to HOST:PORT with an asyncio event loop in a process of its own, the way the
tunnels' local side does, but with no SSH behind it. `bench/lab_bench.py --tcp-via-proxy` points the bench's
`tcp` mode through it. Prints {"event": "ready"} once listening, like bench/tcp_stage.py; runs until killed.

    python3 bench/tcp_proxy.py LOCAL_PORT:HOST:PORT [...]
"""

from __future__ import annotations

import asyncio
import functools
import sys


class _Local(asyncio.Protocol):
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.remote: _Remote | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, self.remote = await loop.create_connection(lambda: _Remote(self), *self.target)
        except OSError:
            assert self.transport is not None
            self.transport.close()
            return
        assert self.transport is not None
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.remote is not None and self.remote.transport is not None:
            self.remote.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.remote is not None and self.remote.transport is not None:
            self.remote.transport.close()


class _Remote(asyncio.Protocol):
    def __init__(self, local: _Local) -> None:
        self.local = local
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.local.transport is not None:
            self.local.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.local.transport is not None:
            self.local.transport.close()


async def main(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    for spec in specs:
        local_port, host, port = spec.split(":")
        await loop.create_server(functools.partial(_Local, (host, int(port))), "127.0.0.1", int(local_port))
    print('{"event": "ready"}', flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1:]))
