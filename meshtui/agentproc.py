"""A running agent on one host: its SSH channel, what it says (ready, pongs, replies, its log) and the commands it
answers (ping, seed, stats); and launching it from the pushed runtime."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shlex
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import asyncssh

from meshtui.errors import HostError
from meshtui.hostfacts import count_field, repacked_weights_field, socket_path_field, weight_repack_field
from meshtui.hosts import runtime_check, runtime_refusal
from meshtui.inventory import HostSpec
from meshtui.remoteio import read_lines
from meshtui.runtime import AGENT_FILE, RuntimeBundle, weight_repack_wanted
from meshtui.text import one_line, printable

LAUNCH_TIMEOUT = 60.0  # seconds for a launched agent to say it is ready


class Agent:
    """A running `meshtui_agent.py serve` on a host. Closing its channel makes it exit."""

    def __init__(self, host: HostSpec, process: asyncssh.SSHClientProcess[str],
                 on_log: Callable[[str], None]) -> None:
        self.host = host
        self.process = process
        self.on_log = on_log
        self.socket_path = ""  # the stage's Unix socket on the host, in a 0700 folder
        self.pid = 0
        self.devices: list[dict[str, Any]] = []
        self.backends: list[str] = []
        self.weight_repack: bool | None = None  # the agent's server repacks weights (None: its runtime cannot)
        self.runtime_dir = ""  # the runtime it runs from, as a shell word ('"$HOME"/...'): `put` runs from it too
        self.cache_dir: str | None = None  # its weights cache on the host (None: this runtime keeps none)
        self.cache_limit: int | None = None
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self.exited = asyncio.Event()
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pongs: dict[str, asyncio.Future[float]] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}  # "seed" and "stats", by seq
        self._seq = itertools.count()
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]

    async def _read_stdout(self) -> None:
        try:
            async for line in read_lines(self.process.stdout):
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                except (ValueError, RecursionError):  # RecursionError: brackets nested deeper than json goes
                    self.on_log(f"agent printed: {one_line(line)}")
                    if not self._ready.done():
                        self._ready.set_exception(HostError(
                            f"agent printed garbage instead of starting: {one_line(line)}", host=self.host.name))
                    continue
                event = msg.get("event")
                if event in ("ready", "error") and not self._ready.done():
                    self._ready.set_result(msg)
                elif event == "pong":
                    future = self._pongs.pop(str(msg.get("seq")), None)
                    if future and not future.done():
                        future.set_result(time.perf_counter())
                elif event in ("seeded", "stats"):
                    reply = self._replies.pop(str(msg.get("seq")), None)
                    if reply and not reply.done():
                        reply.set_result(msg)
        except (OSError, asyncssh.Error) as err:
            self.on_log(f"agent channel error: {one_line(err)}")
        finally:
            self.exited.set()
            if not self._ready.done():
                self._ready.set_result({"event": "exited"})
            for future in self._pongs.values():
                if not future.done():
                    future.cancel()
            for reply in self._replies.values():
                if not reply.done():
                    reply.cancel()

    async def _read_stderr(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            async for raw in read_lines(self.process.stderr):
                line = printable(raw.rstrip())
                if line:
                    self.stderr_tail.append(line)
                    self.on_log(line)

    async def wait_ready(self, timeout: float = LAUNCH_TIMEOUT) -> None:
        try:
            msg = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError as err:
            raise HostError(f"agent did not become ready within {timeout:.0f}s", host=self.host.name) from err
        if msg.get("event") == "exited":
            # Its last words may still be on their way on stderr.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._tasks[1]), 2.0)
            detail = self.stderr_tail[-1] if self.stderr_tail else "no output"
            raise HostError(f"agent exited at start: {one_line(detail)}", host=self.host.name)
        if msg.get("event") == "error":
            code = msg.get("code")
            raise HostError(f"agent cannot serve: {one_line(msg.get('reason'))}", host=self.host.name,
                            code=code if isinstance(code, str) else None)
        try:
            self.socket_path = socket_path_field(msg)
            self.pid = count_field(msg, "pid", 1, 1 << 31)
            devices, backends = msg.get("devices") or [], msg.get("backends") or []
            if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices) or len(devices) > 64:
                raise ValueError("key 'devices': expected a list of objects")
            if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends) or len(backends) > 16:
                raise ValueError("key 'backends': expected a list of names")
        except ValueError as err:
            raise HostError(f"agent answered something unexpected: {err}", host=self.host.name) from err
        cache_dir, cache_limit = msg.get("cache_dir"), msg.get("cache_limit")
        if isinstance(cache_dir, str) and cache_dir.startswith("/") and printable(cache_dir) == cache_dir:
            self.cache_dir = cache_dir
        if isinstance(cache_limit, int) and not isinstance(cache_limit, bool) and cache_limit >= 0:
            self.cache_limit = cache_limit
        self.devices = [{str(k)[:64]: printable(v) if isinstance(v, str) else v for k, v in d.items()}
                        for d in devices]
        self.backends = [printable(b[:64]) for b in backends]
        self.weight_repack = weight_repack_field(msg)

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time in seconds through the same SSH connection the stage traffic uses."""
        seq = str(next(self._seq))
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pongs[seq] = future
        sent = time.perf_counter()
        self.process.stdin.write(f"ping {seq}\n")
        return await asyncio.wait_for(future, timeout) - sent

    def _request(self, line: Callable[[str], str]) -> tuple[str, asyncio.Future[dict[str, Any]]]:
        """Send the command `line(seq)` with a fresh seq; the future gets the agent's reply (cancelled if it exits)."""
        seq = str(next(self._seq))
        self.process.stdin.write(line(seq))  # the reply is read only once the caller awaits: registered in time
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[seq] = future
        return seq, future

    async def seed(self, model_path: str, regions: list[tuple[int, int]], timeout: float = 600.0) -> dict[str, Any]:
        """Ask the agent to put these byte ranges of its own copy of the model into its cache, named by hash."""
        _, future = self._request(
            lambda seq: "seed " + json.dumps({"seq": seq, "model": model_path, "regions": regions}) + "\n")
        return await asyncio.wait_for(future, timeout)

    async def repacked_weights(self, timeout: float = 5.0) -> int | None:
        """How many weight tensors the agent's server holds in the CPU backend's repacked layouts now; None from a
        runtime without meshtui's repack patch."""
        if self.weight_repack is None or not self.alive:
            return None
        try:
            seq, future = self._request(lambda seq: f"stats {seq}\n")
        except (OSError, asyncssh.Error):
            return None
        done, _ = await asyncio.wait({future}, timeout=timeout)
        self._replies.pop(seq, None)
        if not done or future.cancelled():
            return None
        return repacked_weights_field(future.result())

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    async def exit_report(self, timeout: float = 1.0) -> tuple[int | None, str | None]:
        """(exit status, signal name) as the SSH channel reported them, once the agent's output ended.

        The report follows the end of its output: wait a moment for the channel to close. (None, None) when the
        channel closed without one (the connection itself went away).
        """
        with contextlib.suppress(asyncio.TimeoutError, OSError, asyncssh.Error):
            await asyncio.wait_for(self.process.wait_closed(), timeout)
        status = self.process.exit_status
        signal = self.process.exit_signal
        return (status if status is not None and status >= 0 else None), (signal[0] if signal else None)

    async def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self.process.stdin.write_eof()
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except asyncio.TimeoutError:
            self.on_log("agent did not exit on EOF; closing its channel")
        self.process.close()
        for task in self._tasks:
            task.cancel()


async def launch_agent(
    conn: asyncssh.SSHClientConnection,
    host: HostSpec,
    bundle: RuntimeBundle,
    on_log: Callable[[str], None] = lambda line: None,
    gpu: bool = False,
    runtime_dir: str | None = None,
) -> Agent:
    """Start the agent from the pushed bundle, or from `runtime_dir` (a runtime built on the host)."""
    problems = await runtime_check(conn, host, bundle, runtime_dir)
    if problems:
        raise runtime_refusal(host, runtime_dir or bundle.remote_dir, problems)
    remote = f'"$HOME"/{runtime_dir or bundle.remote_dir}'
    command = f"{shlex.quote(host.python)} {remote}/{AGENT_FILE} serve --runtime {remote}"
    if host.threads:
        command += f" --threads {int(host.threads)}"
    if gpu:
        command += " --gpu"
    if host.cache_limit is not None:
        command += f" --cache-limit {int(host.cache_limit)}"
    if not weight_repack_wanted():
        command += " --no-repack"
    try:
        process = await conn.create_process(command, encoding="utf-8", errors="replace")
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"cannot start the agent: {one_line(err)}", host=host.name) from err
    agent = Agent(host, process, on_log)
    agent.runtime_dir = remote
    try:
        await agent.wait_ready()
    except BaseException:
        await agent.close(timeout=2.0)
        raise
    return agent
