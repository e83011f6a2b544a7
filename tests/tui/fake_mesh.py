"""A scripted stand-in for meshtui.mesh.Mesh with the surface the TUI uses (see meshtui/tui/protocol.py).

It tells the listener the events a real mesh tells, in the core's order, so the app's state (meshtui/state.py)
folds from them exactly as it would from a real mesh; it keeps `Node`s too, for the tests that poke it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from meshtui import events as ev
from meshtui.errors import MeshError
from meshtui.inventory import HeadSpec, HostSpec, Inventory, ModelSpec, SSHSpec
from meshtui.mesh import Node, RejoinPolicy
from meshtui.planner import NodeAssignment, Plan

MiB = 1024**2
GiB = 1024**3
HOSTS = ("lab1", "lab2")
RTT_MS = {"lab1": 1.2, "lab2": 3.4}
STAGE_MS = {"lab1": (7.5, 6.9, 8.1, 7.2), "lab2": (11.0, 9.8, 12.6, 10.4)}


def make_inventory(hosts: Sequence[str] = HOSTS) -> Inventory:
    return Inventory(
        source="<test lab>", model=ModelSpec(path=None, name="smollm2"), head=HeadSpec(), ssh=SSHSpec(),
        hosts=tuple(HostSpec(name=h, address="127.0.0.1", port=2200 + i) for i, h in enumerate(hosts)),
    )


def make_plan() -> Plan:
    return Plan(n_layer=30, context=2048, reasons=(), assignments=(
        NodeAssignment("head", 0, 13, 60 * MiB, 20 * MiB, 22 * GiB, True),
        NodeAssignment("lab1", 13, 25, 45 * MiB, 8 * MiB, 21 * GiB, False),
        NodeAssignment("lab2", 25, 31, 50 * MiB, 18 * MiB, 21 * GiB, False),
    ))


def facts(name: str) -> dict[str, Any]:
    return {"hostname": name, "os": "Linux", "arch": "x86_64", "python": "3.11.2", "glibc": "2.36",
            "cores": 2, "mem_total": 24 * GiB, "mem_available": 22 * GiB, "gpus": []}


def provisioning_script(plan: Plan, *, until: str = "ready") -> list[ev.Event]:
    """The events of a two-host bring-up, in the core's order; `until="push"` stops mid-push."""
    events: list[ev.Event] = [ev.HostProbed("head", facts("head"))]
    for host in HOSTS:
        events += [ev.HostPhaseChanged(host, "connect", f"127.0.0.1:{2200 + HOSTS.index(host)}"),
                   ev.HostPhaseChanged(host, "probe"), ev.HostProbed(host, facts(host))]
    events += [ev.LogRecorded("model", "SmolLM2: 30 layers, 95 MB"), ev.PlanComputed(plan)]
    events += [ev.HostPhaseChanged("lab1", "push", "2.6 MB"), ev.HostPhaseChanged("lab2", "push", "2.6 MB")]
    for done in (512 * 1024, 1300 * 1024, 2600 * 1024):
        events.append(ev.TransferProgressed("lab1", "push", done, 2600 * 1024))
    events.append(ev.TransferProgressed("lab2", "push", 900 * 1024, 2600 * 1024))
    if until == "push":
        return events
    events += [ev.TransferProgressed("lab2", "push", 2600 * 1024, 2600 * 1024)]
    for i, host in enumerate(HOSTS):
        socket = f"/home/{host}/.cache/meshtui/run/stage-x/stage.sock"
        events += [ev.HostPhaseChanged(host, "launch"), ev.AgentLaunched(host, socket, 4242 + i),
                   ev.RoundTripMeasured(host, RTT_MS[host])]
    for node in ("lab1", "lab2", "head"):
        events.append(ev.HostPhaseChanged(node, "load"))
    for host in HOSTS:
        events += [ev.TransferProgressed(host, "load", 20 * MiB, 53 * MiB),
                   ev.TransferProgressed(host, "load", 53 * MiB, None)]
    events.append(ev.ModelLoaded(1.2, 106 * MiB, {}))
    events += [ev.HostPhaseChanged(n, "ready") for n in ("head", *HOSTS)]
    events += [ev.LogRecorded("engine", "model loaded"), ev.MeshReady()]
    return events


class FakeMesh:
    def __init__(self, inventory: Inventory, *, listener: ev.Listener, until: str = "ready",
                 fail_up: MeshError | None = None, reply: Sequence[str] = ("Hello", " there", "!"),
                 tokens_per_second: float = 42.5, hold_after: int | None = None, token_gap: float = 0.0,
                 hold_up: bool = False) -> None:
        self.listener = listener
        self.head = Node(name="head", address="127.0.0.1", is_head=True)
        self.hosts = [Node(name=h.name, address=h.address) for h in inventory.hosts]
        self.plan: Plan | None = None
        self.parallel = 1  # one reply at a time: the chat's scripted replies never overlap
        self.until = until
        self.fail_up = fail_up
        self.reply = list(reply)
        self.tokens_per_second = tokens_per_second
        self.hold_after = hold_after  # stop streaming after this many tokens until cancel()
        self.token_gap = token_gap  # seconds between tokens (0: just yield to the loop)
        self.release_up = asyncio.Event()  # with hold_up, up() waits for it before MeshReady (or failing)
        if not hold_up:
            self.release_up.set()
        self.stream_calls: list[list[dict[str, str]]] = []
        self.rejoined: list[str] = []
        self.auto_rejoin: RejoinPolicy | None = None
        self.engine_alive = False  # what Mesh.ready reads: loaded, and not lost with a stage
        self.cancelled = False
        self.closed = False
        self._cancel = asyncio.Event()
        self._request_ids = 0

    @property
    def nodes(self) -> list[Node]:
        return [self.head, *self.hosts]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def emit(self, event: ev.Event) -> ev.Event:
        """Change the nodes the way the orchestrator does, then tell the listener."""
        match event:
            case ev.HostPhaseChanged(host=host, phase=phase):
                self.node(host).status = phase
            case ev.StageStalled(host=host):
                self.node(host).status = "stalled"
            case ev.StageResponsive(host=host):
                self.node(host).status = "ready"
            case ev.HostFailed(host=host, reason=reason) | ev.StageFailed(host=host, reason=reason):
                self.node(host).status = "failed"
                self.node(host).reason = reason
            case ev.PlanComputed(plan=plan):
                self.plan = plan
                for a in plan.assignments:
                    node = self.node(a.name)
                    node.layers = (a.start, a.end) if a.n_layers else None
            case ev.RoundTripMeasured(host=host, rtt_ms=rtt):
                self.node(host).rtt_ms = rtt
        if isinstance(event, (ev.MeshReady, ev.MeshRecovered, ev.HostRejoined)):
            self.engine_alive = True
        elif isinstance(event, (ev.StageFailed, ev.MeshRecovering)):
            self.engine_alive = False  # ggml took the engine down with the stage
        self.listener(event)
        return event

    async def up(self) -> None:
        for event in provisioning_script(make_plan(), until=self.until):
            if isinstance(event, ev.MeshReady):
                await self.release_up.wait()
            self.emit(event)
            await asyncio.sleep(0)
        if self.fail_up is not None:
            await self.release_up.wait()
            self.emit(ev.HostFailed("lab2", "push", self.fail_up.reason))
            raise self.fail_up
        if self.until != "ready":
            await asyncio.Event().wait()  # provisioning that never ends, for the snapshot

    async def stream(self, *, messages: Sequence[dict[str, str]] | None = None, max_tokens: int = 256,
                     temperature: float = 0.7, seed: int = 0, source: str = "") -> AsyncIterator[ev.Event]:
        self.stream_calls.append([dict(m) for m in messages or ()])
        self.cancelled = False
        self._cancel.clear()
        self._request_ids += 1
        rid = self._request_ids
        yield self.emit(ev.ReplyStarted(rid, 12, source))
        text, ids = "", []
        for i, piece in enumerate(self.reply):
            if self.cancelled:
                break
            await asyncio.sleep(self.token_gap)
            text += piece
            ids.append(1000 + i)
            yield self.emit(ev.TokenGenerated(rid, i, 1000 + i, piece))
            if i >= 1:
                for host in HOSTS:
                    ms = STAGE_MS[host][i % len(STAGE_MS[host])]
                    yield self.emit(ev.StageLatencyMeasured(host, i, ms, RTT_MS[host], 9398, 2312))
            if self.hold_after is not None and i + 1 == self.hold_after:
                await self._cancel.wait()
        stop = "cancelled" if self.cancelled else "stop"
        yield self.emit(ev.ReplyFinished(rid, text, tuple(ids), 0.5, self.tokens_per_second, stop, source=source))

    def cancel(self, request_id: int | None = None) -> None:
        self.cancelled = True
        self._cancel.set()

    @property
    def ready(self) -> bool:
        return self.engine_alive and not self.closed

    def enable_auto_rejoin(self, policy: RejoinPolicy | None = None) -> None:
        self.auto_rejoin = policy or RejoinPolicy()

    def recover_from(self, host: str, seconds: float = 0.8) -> None:
        """What the core reports once it re-planned on the survivors and the engine is loaded again."""
        self.emit(ev.MeshRecovering(host, self.node(host).reason))
        self.node(host).layers = None
        self.emit(ev.MeshRecovered(host, 3, seconds))

    async def rejoin(self, name: str) -> None:
        self.rejoined.append(name)
        node = self.node(name)
        node.status, node.reason = "ready", ""
        self.emit(ev.HostRejoined(name))

    def lose_stage(self, host: str, reason: str) -> None:
        """What the core reports when a stage dies: HostFailed (phase "serve"), then StageFailed."""
        self.emit(ev.HostFailed(host, "serve", reason))
        self.emit(ev.StageFailed(host, reason))

    async def close(self) -> None:
        self.closed = True
        for node in self.nodes:
            if node.status != "failed":
                node.status = "stopped"
        self.emit(ev.MeshClosed())
