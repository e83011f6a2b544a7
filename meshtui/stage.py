"""One host's serving stack, owned end to end: SSH connection -> agent -> tunnel -> health.

The orchestrator keeps the sequence (up, stream, recover, close) and a `Node` of plain data per host; a `Stage`
holds the live objects behind it and answers the questions the sequence asks: is it serving, since when has it
owed an answer (the step watchdog's clock), how long is a round trip, and, once it is gone, why. It reports
through the callbacks it is given and raises `HostError` (host and reason as fields) when a step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import asyncssh

from meshtui.agentproc import Agent, launch_agent
from meshtui.errors import HostError
from meshtui.failures import agent_exit_cause
from meshtui.hostbuild import build_on_host
from meshtui.hosts import AGENT_CANNOT_LOAD, HostFacts, probe_host, push_runtime
from meshtui.inventory import HostSpec, SSHSpec
from meshtui.rpcwire import rpc_hello
from meshtui.runtime import RuntimeBundle
from meshtui.ssh import connect_host
from meshtui.tunnels import StageTunnel

RTT_SAMPLES = 10


@dataclass(frozen=True)
class StageReport:
    """Where a stage tells what it does: a phase with its detail, a runtime build's step, a log line, transfer
    progress."""

    phase: Callable[[str, str], None]
    build: Callable[[str], None]  # the push phase is a build on the host: what it does now
    log: Callable[[str, str], None]  # (message, level)
    progress: Callable[[int, int], None]


class Stage:
    def __init__(self, spec: HostSpec, ssh: SSHSpec, report: StageReport) -> None:
        self.spec = spec
        self.ssh = ssh
        self.report = report
        self.conn: asyncssh.SSHClientConnection | None = None
        self.host_key: asyncssh.SSHKey | None = None  # the key accepted at start: every reconnect must show it
        self.agent: Agent | None = None
        self.tunnel: StageTunnel | None = None
        self.rtt_samples: deque[float] = deque(maxlen=RTT_SAMPLES)
        self.rpc_protocol: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def rtt_ms(self) -> float | None:
        """The minimum of recent pings: a busy moment only ever adds to a round trip."""
        return min(self.rtt_samples) if self.rtt_samples else None

    # -- connection ------------------------------------------------------------------------------
    async def connect_and_probe(self, *, accept_new: bool) -> HostFacts:
        """Connect (taking only the key accepted before, once there is one) and probe the host."""
        self.report.phase("connect", f"{self.spec.address}:{self.spec.port or 22}")
        self.conn = await connect_host(self.spec, self.ssh, accept_new=accept_new, pinned_key=self.host_key,
                                       log=lambda msg: self.report.log(msg, "warning"))
        self.host_key = self.host_key or self.conn.get_server_host_key()
        self.report.phase("probe", "")
        # A host that answers SSH but hangs in the probe is as good as unreachable.
        return await probe_host(self.conn, self.spec, timeout=2 * self.ssh.connect_timeout)

    async def unreachable(self) -> HostError | None:
        """Why the host does not answer SSH with the key accepted at start, or None when it does (for the
        background rejoin; the connection is closed again at once)."""
        try:
            conn = await connect_host(self.spec, self.ssh, pinned_key=self.host_key)
        except HostError as err:
            return err
        conn.close()
        return None

    # -- agent and tunnel ------------------------------------------------------------------------
    async def start(self, bundle: RuntimeBundle, *, gpu: bool) -> None:
        """Push (or build) the runtime, launch the agent, open the tunnel, take a first round trip."""
        conn = self._conn()
        on_log = lambda line: self.report.log(line, "debug")  # noqa: E731
        runtime_dir = None
        if self.spec.runtime == "build" or gpu:
            runtime_dir = await self._build_on_host(conn)
        else:
            self.report.phase("push", f"{bundle.total_bytes} bytes")
            sent = await push_runtime(conn, self.spec, bundle, on_progress=self.report.progress,
                                      on_log=lambda line: self.report.log(line, "warning"))
            pushed = f"pushed {sent} bytes" if sent else "already there"
            self.report.log(f"runtime {bundle.digest} ({bundle.kind}): {pushed}", "info")
        self.report.phase("launch", "")
        try:
            agent = await launch_agent(conn, self.spec, bundle, on_log=on_log, gpu=gpu, runtime_dir=runtime_dir)
        except HostError as err:
            # The pushed runtime does not load there (another glibc, a missing library): build it there.
            if self.spec.runtime != "auto" or err.code != AGENT_CANNOT_LOAD:
                raise
            self.report.log(f"{err.reason}; building the runtime on the host instead", "warning")
            runtime_dir = await self._build_on_host(conn)
            self.report.phase("launch", "")
            agent = await launch_agent(conn, self.spec, bundle, on_log=on_log, runtime_dir=runtime_dir)
        self.agent = agent
        if gpu and not any(d.get("type") == "gpu" for d in agent.devices):
            await agent.close(timeout=2.0)
            raise HostError("the runtime built on the host exposes no GPU (backends: "
                            f"{', '.join(agent.backends) or 'cpu'}); set gpu = false to use its CPU", host=self.name)

    async def open_tunnel(self) -> None:
        agent = self.running_agent()
        self.tunnel = StageTunnel(self._conn(), agent.socket_path, on_error=lambda msg: self.report.log(msg, "error"))
        await self.tunnel.start()
        await self.ping()

    async def _build_on_host(self, conn: asyncssh.SSHClientConnection) -> str:
        self.report.build("building the runtime on the host")
        return await build_on_host(conn, self.spec, on_progress=lambda step: self.report.build(f"build: {step}"),
                                   on_log=self.report.log)

    async def check_protocol(self, expected: tuple[int, int, int] | None) -> None:
        """The stage must speak the head's RPC protocol: ggml aborts on a mismatch, so ask first."""
        try:
            got = await rpc_hello(str(self._tunnel().local_path))
        except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as err:
            raise HostError(f"the stage does not answer the RPC handshake through its tunnel: {err}",
                            host=self.name) from err
        self.rpc_protocol = got
        if expected is not None and got[0] != expected[0]:
            version = ".".join(map(str, got))
            raise HostError(f"the stage speaks ggml RPC v{version} but the head speaks v"
                            f"{'.'.join(map(str, expected))}; use the runtime meshtui pushes", host=self.name)

    # -- health ----------------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """An agent is up and its tunnel open."""
        return self.agent is not None and self.agent.alive and self.tunnel is not None

    async def ping(self, timeout: float | None = None) -> None:
        """One round trip through the agent's channel, kept when it comes back (a lost one adds nothing)."""
        if self.agent is None or not self.agent.alive:
            return
        with contextlib.suppress(asyncio.TimeoutError, OSError, asyncssh.Error):
            self.rtt_samples.append(await self.agent.ping() * 1000.0)

    def waiting_since(self) -> float | None:
        """Since when the stage has owed an answer (a step under way, or its channel blocked): the watchdog's
        clock. None when it owes nothing."""
        if self.tunnel is None:
            return None
        waits = [t for t in (self.tunnel.meter.awaiting_since, self.tunnel.blocked_since) if t is not None]
        return min(waits) if waits else None

    async def cause_of_loss(self) -> str | None:
        """Why the stage is gone, in words a user can act on; None while it is not. Its agent's last output goes
        to the log."""
        if self.conn is not None and self.conn.is_closed():
            return "SSH connection lost"
        if self.agent is None or self.agent.alive:
            return None
        status, signal = await self.agent.exit_report()
        tail = list(self.agent.stderr_tail)
        if tail:
            self.report.log(f"its agent's last output: {' | '.join(tail[-3:])}", "error")
        return agent_exit_cause(status, signal, tail)

    def abort(self) -> None:
        """Cut the engine's connections through the tunnel (the stage is declared lost)."""
        if self.tunnel is not None:
            self.tunnel.abort_connections()

    # -- teardown --------------------------------------------------------------------------------
    async def drop(self, *, stalled: bool) -> None:
        """Close the tunnel, the agent and the connection; the accepted host key is kept for a rejoin."""
        if self.tunnel is not None:
            await self.tunnel.close()
            self.tunnel = None
        if self.agent is not None:
            # A stalled agent will not see its EOF until it runs again: don't wait for it to exit.
            with contextlib.suppress(Exception):  # the agent is gone already; nothing to report
                await self.agent.close(timeout=0.0 if stalled else 1.0)
            self.agent = None
        if self.conn is not None:
            self.conn.abort()
            self.conn = None

    async def close(self) -> None:
        """Close the tunnel, let the agent exit on its EOF, close the connection and wait for it."""
        if self.tunnel is not None:
            await self.tunnel.close()
        if self.agent is not None:
            await self.agent.close()
        if self.conn is not None:
            self.conn.close()
            await self.conn.wait_closed()

    def _conn(self) -> asyncssh.SSHClientConnection:
        if self.conn is None:
            raise HostError("not connected", host=self.name)
        return self.conn

    def running_agent(self) -> Agent:
        if self.agent is None:
            raise HostError("no agent running", host=self.name)
        return self.agent

    def _tunnel(self) -> StageTunnel:
        if self.tunnel is None:
            raise HostError("no tunnel open", host=self.name)
        return self.tunnel
