"""SSH forwards from a private Unix socket on the head to each stage's, metering the RPC framing on the way.

Nothing listens on any network, and no other user reaches a stage: the local side is a Unix socket in a fresh
0700 folder (meshtui/unixsock.py), the far side a direct-streamlocal@openssh.com channel, opened inside the
host's SSH connection, to the agent's Unix socket in its own 0700 folder on the host.

Upstream bytes are coalesced by RPC frame: ggml's client writes each command as several small writes (command
byte, size, payload) and a decode step as about nine commands of which only the last is answered. Every
write forwarded on its own costs an SSH packet here (Python: framing, AES-GCM, a syscall) and a wake-up,
decryption and write in the host's sshd and the stage. The server can do nothing with a command it need not
answer before the next answered one arrives, so the tunnel holds bytes until a command the server answers is
complete (or FLUSH_BYTES are held, for weight uploads, or HOLD_SECONDS pass, a safety net): one packet a step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncssh

from meshtui.rpcwire import RpcMeter
from meshtui.unixsock import private_socket_dir, remove_socket_dir, unix_endpoint

_perf = time.perf_counter
FLUSH_BYTES = 256 * 1024  # send at once beyond this (model loads stream SET_TENSOR payloads of many MB)
HOLD_SECONDS = 0.002  # never hold bytes longer than this, whatever the framing says


class _ChannelSide(asyncssh.SSHUNIXSession[bytes]):
    def __init__(self, local: _LocalSide) -> None:
        self._local = local

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._local.meter.feed_down(data, _perf())
        if self._local.transport is not None:
            self._local.transport.write(data)

    def eof_received(self) -> bool:
        if self._local.transport is not None and self._local.transport.can_write_eof():
            self._local.transport.write_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._local.transport is not None:
            self._local.transport.close()

    def pause_writing(self) -> None:
        # The stage stopped taking bytes (its channel window is spent): the watchdog's clock for uploads.
        if self._local.blocked_since is None:
            self._local.blocked_since = _perf()
        if self._local.transport is not None:
            self._local.transport.pause_reading()

    def resume_writing(self) -> None:
        self._local.blocked_since = None
        if self._local.transport is not None:
            self._local.transport.resume_reading()


class _LocalSide(asyncio.Protocol):
    def __init__(self, tunnel: StageTunnel) -> None:
        self.tunnel = tunnel
        self.meter = tunnel.meter
        self.transport: asyncio.Transport | None = None
        self.channel: asyncssh.SSHUNIXChannel[bytes] | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self.blocked_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()
        self.meter.connection_changed()  # one engine connection at a time: a new one starts a new stream
        self.tunnel.connections.add(self)
        task = asyncio.get_running_loop().create_task(self._open_channel())
        self.tunnel.tasks.add(task)
        task.add_done_callback(self.tunnel.tasks.discard)

    async def _open_channel(self) -> None:
        try:
            channel, _ = await self.tunnel.conn.create_unix_connection(
                lambda: _ChannelSide(self), self.tunnel.remote_path, encoding=None,
                window=self.tunnel.window, max_pktsize=self.tunnel.max_pktsize,
            )
        except (OSError, asyncssh.Error) as err:
            self.tunnel.on_error(f"cannot open the forward to the agent: {err}")
            if self.transport is not None:
                self.transport.close()
            return
        self.channel = channel
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        answered = self.meter.feed_up(data, _perf())
        self._held.append(data)
        self._held_bytes += len(data)
        if answered or self._held_bytes >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(HOLD_SECONDS, self.flush)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flush(self) -> None:
        self._cancel_timer()
        if self._held and self.channel is not None:
            self.channel.write(self._held[0] if len(self._held) == 1 else b"".join(self._held))
            self._held.clear()
            self._held_bytes = 0

    def abort(self) -> None:
        self._cancel_timer()
        self._held.clear()
        if self.transport is not None:
            self.transport.abort()
        if self.channel is not None:
            self.channel.abort()

    def eof_received(self) -> bool:
        self.flush()
        if self.channel is not None:
            self.channel.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.connections.discard(self)
        self.meter.connection_changed()  # what it still waited for will never be answered
        self.flush()
        if self.channel is not None:
            self.channel.close()

    def pause_writing(self) -> None:
        if self.channel is not None:
            self.channel.pause_reading()

    def resume_writing(self) -> None:
        if self.channel is not None:
            self.channel.resume_reading()


class StageTunnel:
    """A Unix socket on the head (local_path) -> the stage's Unix socket on a host, through its SSH connection."""

    SOCKET_NAME = "stage.sock"

    def __init__(
        self,
        conn: asyncssh.SSHClientConnection,
        remote_path: str,
        on_error: Callable[[str], None] = lambda message: None,
        *,
        window: int = 8 * 1024 * 1024,
        max_pktsize: int = 32768,
    ) -> None:
        self.conn = conn
        self.remote_path = remote_path
        self.on_error = on_error
        self.meter = RpcMeter()
        self.window = window
        self.max_pktsize = max_pktsize
        self.connections: set[_LocalSide] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._folder: Path | None = None
        self.local_path: Path | None = None

    @property
    def blocked_since(self) -> float | None:
        """Since when the stage has taken no upstream bytes though some are waiting; None if it takes them."""
        times = [side.blocked_since for side in self.connections if side.blocked_since is not None]
        return min(times) if times else None

    @property
    def endpoint(self) -> str:
        """What the engine's ggml connects to: "unix:<local_path>"."""
        return unix_endpoint(self.local_path or "")

    async def start(self) -> Path:
        loop = asyncio.get_running_loop()
        self._folder = private_socket_dir("tunnel-", self.SOCKET_NAME)
        self.local_path = self._folder / self.SOCKET_NAME
        try:
            self._server = await loop.create_unix_server(lambda: _LocalSide(self), str(self.local_path))
        except OSError:
            remove_socket_dir(self._folder)
            raise
        return self.local_path

    def abort_connections(self) -> None:
        """Cut the engine's connections through this tunnel (the stage behind it is lost)."""
        for side in list(self.connections):
            side.abort()
        self.connections.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._folder is not None:
            remove_socket_dir(self._folder)
            self._folder = None
        self.abort_connections()
        for task in list(self.tasks):
            task.cancel()
