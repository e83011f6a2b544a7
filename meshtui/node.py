"""What the orchestrator knows of each node, as plain data, and the one place that changes a node and tells.

A host's live objects (connection, agent, tunnel) are its `Stage`; a `Node` holds only the facts the
orchestrator works with: its status, its layers, its round trip. What the views read (latencies included) is
`meshtui.state`, folded from the events. `NodeSink` is how every part of the orchestrator (the load, the step watchdog,
the rejoin watch) changes a node's status or writes a log line: the change and its event always go together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshtui import events as ev
from meshtui.hosts import HostFacts


@dataclass
class Node:
    """One node (the head or a host): plain data, changed only through a `NodeSink`."""

    name: str
    address: str
    is_head: bool = False
    status: str = "pending"
    reason: str = ""
    facts: HostFacts | None = None  # None until the node is probed
    layers: tuple[int, int] | None = None
    rtt_ms: float | None = None  # its stage's round trip (the minimum of recent pings)
    lost_reason: str = ""  # the step watchdog declared it lost; the failure path takes it from here
    stalled_seconds: float | None = None  # how long its stall lasted before it was declared lost


@dataclass(frozen=True)
class Recovery:
    """A stage lost mid-run and the mesh rebuilt without it."""

    node: str
    token_index: int  # tokens of the reply already generated when it happened
    seconds: float  # from noticing the loss to the engine loaded again
    stalled_seconds: float | None = None  # how long the stage was stalled before the watchdog declared it lost

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "token_index": self.token_index, "seconds": self.seconds,
                "stalled_seconds": self.stalled_seconds}


@dataclass(frozen=True)
class NodeSink:
    """Changes a node's status and emits the matching event; writes log lines as events."""

    emit: ev.Listener

    def log(self, source: str, message: str, level: str = "info") -> None:
        self.emit(ev.LogRecorded(source=source, message=message, level=level))

    def phase(self, node: Node, phase: str, detail: str = "", *, building: bool = False) -> None:
        node.status = phase
        self.emit(ev.HostPhaseChanged(node.name, phase, detail, building))

    def fail(self, node: Node, phase: str, reason: str) -> None:
        node.status = "failed"
        node.reason = reason
        self.emit(ev.HostFailed(node.name, phase, reason))
