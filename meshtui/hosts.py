"""Acting on one host over its SSH connection: probe it, push the runtime, launch and watch its agent."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import shlex
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from meshtui.errors import HostError
from meshtui.inventory import HostSpec
from meshtui.runtime import AGENT_FILE, RuntimeBundle, agent_source_path

PROBE_TIMEOUT = 30.0
LAUNCH_TIMEOUT = 60.0


@dataclass(frozen=True)
class HostFacts:
    """What `meshtui_agent.py probe` reported."""

    hostname: str
    os: str
    arch: str
    python: str
    glibc: str | None
    cores: int
    mem_total: int
    mem_available: int
    gpus: tuple[dict[str, Any], ...]
    mem_bandwidth: int | None = None  # bytes/s one core copies (agent's probe)
    nvcc: bool = False  # the CUDA compiler is on PATH
    cmake: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostFacts:
        return cls(
            hostname=str(data["hostname"]),
            os=str(data["os"]),
            arch=str(data["arch"]),
            python=str(data["python"]),
            glibc=data.get("glibc"),
            cores=int(data["cores"]),
            mem_total=int(data["mem_total"]),
            mem_available=int(data["mem_available"]),
            gpus=tuple(data.get("gpus") or ()),
            mem_bandwidth=int(data["mem_bandwidth"]) if data.get("mem_bandwidth") else None,
            nvcc=bool(data.get("nvcc")),
            cmake=bool(data.get("cmake")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname, "os": self.os, "arch": self.arch, "python": self.python,
            "glibc": self.glibc, "cores": self.cores, "mem_total": self.mem_total,
            "mem_available": self.mem_available, "gpus": list(self.gpus), "mem_bandwidth": self.mem_bandwidth,
            "nvcc": self.nvcc, "cmake": self.cmake,
        }


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return None


def _oneline(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def probe_host(conn: asyncssh.SSHClientConnection, host: HostSpec,
                     timeout: float = PROBE_TIMEOUT) -> HostFacts:
    """Run the agent's probe by feeding the script on stdin: nothing is written to the host.

    The shell prints its pid before it becomes the probe, so a probe that hangs can be killed (with its
    process group) instead of being left running on the host.
    """
    python = shlex.quote(host.python)
    # Belt and braces: coreutils' timeout (where the host has it) kills the probe's whole process group
    # on the host's own clock, even if the head is gone by then.
    limit = int(timeout) + 2
    command = (f'echo "meshtui-pid $$"; if command -v timeout >/dev/null 2>&1; '
               f'then exec timeout -s KILL {limit} {python} - probe; else exec {python} - probe; fi')
    pid: int | None = None
    try:
        process = await conn.create_process(command, encoding="utf-8", errors="replace")
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"probe failed: {err}", host=host.name) from err
    try:
        process.stdin.write(agent_source_path().read_text())
        process.stdin.write_eof()
        first = await asyncio.wait_for(process.stdout.readline(), timeout)
        if first.startswith("meshtui-pid "):
            pid = int(first.split()[1])
        result = await asyncio.wait_for(process.wait(check=False), timeout)
    except (asyncio.TimeoutError, asyncssh.TimeoutError) as err:
        with contextlib.suppress(OSError, asyncssh.Error):
            process.kill()  # a signal request on the channel, where sshd supports it
        await _kill_remote_group(conn, pid)
        raise HostError(f"probe did not answer within {timeout:.0f}s", host=host.name) from err
    except (OSError, asyncssh.Error, ValueError) as err:
        await _kill_remote_group(conn, pid)
        raise HostError(f"probe failed: {err}", host=host.name) from err
    finally:
        process.close()
    stdout = str(result.stdout or "")
    stderr = str(result.stderr or "")
    if result.exit_status == 127:
        raise HostError(f"'{host.python}' was not found on the host (set python = ... for this host)",
                        host=host.name)
    if "SyntaxError" in stderr:
        raise HostError(f"'{host.python}' is too old for the agent (it needs Python 3.8+)", host=host.name)
    data = _last_json_line(stdout)
    if result.exit_status != 0 or data is None:
        detail = _oneline(stderr or stdout or f"exit status {result.exit_status}")
        raise HostError(f"probe failed: {detail}", host=host.name)
    try:
        return HostFacts.from_json(data)
    except (KeyError, TypeError, ValueError) as err:
        raise HostError(f"probe answered something unexpected: {_oneline(stdout)}", host=host.name) from err


async def _kill_remote_group(conn: asyncssh.SSHClientConnection, pid: int | None) -> None:
    if pid is None or pid <= 1:
        return
    with contextlib.suppress(OSError, asyncssh.Error, asyncio.TimeoutError):
        await conn.run(f"kill -9 -{pid} {pid} 2>/dev/null; kill -9 -- -{pid} 2>/dev/null", check=False, timeout=20)


async def push_runtime(
    conn: asyncssh.SSHClientConnection,
    host: HostSpec,
    bundle: RuntimeBundle,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> int:
    """Put the bundle at ~/<bundle.remote_dir>/ unless it is already there; returns bytes sent."""
    total = bundle.total_bytes
    final = bundle.remote_dir
    try:
        async with conn.start_sftp_client() as sftp:
            if await sftp.exists(f"{final}/.complete"):
                on_progress(0, 0)
                return 0
            staging = f"{final}.partial-{secrets.token_hex(4)}"
            await sftp.makedirs(f"{staging}/lib", exist_ok=True)
            sent_before = 0
            for rel, local in bundle.files:
                base = sent_before

                def progress(_src: bytes, _dst: bytes, done: int, _size: int, base: int = base) -> None:
                    on_progress(base + done, total)

                await sftp.put(str(local), f"{staging}/{rel}", progress_handler=progress)
                sent_before += local.stat().st_size
            await sftp.chmod(f"{staging}/{AGENT_FILE}", 0o755)
            async with sftp.open(f"{staging}/.complete", "w") as marker:
                await marker.write(f"{bundle.digest}\n")
            try:
                await sftp.rename(staging, final)
            except asyncssh.SFTPError:
                # Another head pushed the same bundle meanwhile: theirs is as good as ours.
                if not await sftp.exists(f"{final}/.complete"):
                    raise
                await sftp.rmtree(staging)
            on_progress(total, total)
            return sent_before
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"pushing the runtime failed: {err}", host=host.name) from err


class Agent:
    """A running `meshtui_agent.py serve` on a host. Closing its channel makes it exit."""

    def __init__(self, host: HostSpec, process: asyncssh.SSHClientProcess[str],
                 on_log: Callable[[str], None]) -> None:
        self.host = host
        self.process = process
        self.on_log = on_log
        self.port = 0
        self.pid = 0
        self.devices: list[dict[str, Any]] = []
        self.backends: list[str] = []
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self.exited = asyncio.Event()
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pongs: dict[str, asyncio.Future[float]] = {}
        self._seq = itertools.count()
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]

    async def _read_stdout(self) -> None:
        try:
            async for line in self.process.stdout:
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    self.on_log(f"agent printed: {_oneline(line)}")
                    if not self._ready.done():
                        self._ready.set_exception(HostError(
                            f"agent printed garbage instead of starting: {_oneline(line)}", host=self.host.name))
                    continue
                event = msg.get("event")
                if event in ("ready", "error") and not self._ready.done():
                    self._ready.set_result(msg)
                elif event == "pong":
                    future = self._pongs.pop(str(msg.get("seq")), None)
                    if future and not future.done():
                        future.set_result(time.perf_counter())
        except (OSError, asyncssh.Error) as err:
            self.on_log(f"agent channel error: {err}")
        finally:
            self.exited.set()
            if not self._ready.done():
                self._ready.set_result({"event": "exited"})
            for future in self._pongs.values():
                if not future.done():
                    future.cancel()

    async def _read_stderr(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            async for line in self.process.stderr:
                line = line.rstrip()
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
            raise HostError(f"agent exited at start: {_oneline(detail)}", host=self.host.name)
        if msg.get("event") == "error":
            raise HostError(f"agent cannot serve: {msg.get('reason')}", host=self.host.name)
        self.port = int(msg["port"])
        self.pid = int(msg["pid"])
        self.devices = list(msg.get("devices") or [])
        self.backends = list(msg.get("backends") or [])

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time in seconds through the same SSH connection the stage traffic uses."""
        seq = str(next(self._seq))
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pongs[seq] = future
        sent = time.perf_counter()
        self.process.stdin.write(f"ping {seq}\n")
        return await asyncio.wait_for(future, timeout) - sent

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

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
    remote = f'"$HOME"/{runtime_dir or bundle.remote_dir}'
    command = f"{shlex.quote(host.python)} {remote}/{AGENT_FILE} serve --runtime {remote}"
    if host.threads:
        command += f" --threads {int(host.threads)}"
    if gpu:
        command += " --gpu"
    try:
        process = await conn.create_process(command, encoding="utf-8", errors="replace")
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"cannot start the agent: {err}", host=host.name) from err
    agent = Agent(host, process, on_log)
    try:
        await agent.wait_ready()
    except BaseException:
        await agent.close(timeout=2.0)
        raise
    return agent


async def stop_leftover_agents(conn: asyncssh.SSHClientConnection, host: HostSpec) -> list[dict[str, Any]]:
    """`meshtui down`: stop agents of this user that outlived their head (by their pid files)."""
    command = f"{shlex.quote(host.python)} - down"
    try:
        result = await conn.run(command, input=agent_source_path().read_text(), check=False, timeout=PROBE_TIMEOUT)
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"cleanup failed: {err}", host=host.name) from err
    data = _last_json_line(str(result.stdout or ""))
    if data is None:
        raise HostError(f"cleanup failed: {_oneline(str(result.stderr or result.stdout))}", host=host.name)
    return list(data.get("stopped") or [])
