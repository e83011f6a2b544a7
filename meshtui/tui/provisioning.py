"""Provisioning: one line per node through connect, probe, push, launch, load and ready, failures in place."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from meshtui import events as ev
from meshtui.state import MeshState, NodeState
from meshtui.tui.formatting import transfer
from meshtui.tui.splitbar import SplitBar
from meshtui.tui.tables import TableSync
from meshtui.tui.throttle import Throttle
from meshtui.units import format_size, load_done, load_transfer

HEAD_SKIPS = ("connect", "push", "launch")  # the head runs in this process: nothing to connect, push or launch
TRANSFER_PHASES = ("push", "load")
STAGE_STATUS = {
    "connect": "connecting to the hosts…",
    "probe": "probing the hosts…",
    "push": "pushing the runtime to the hosts…",
    "launch": "launching the agents…",
    "load": "loading the model: weights travel through the SSH tunnels…",
}


def phase_state(node: NodeState, phase: str) -> str:
    """done | active | pending | failed | skipped: where a node stands in one provisioning phase."""
    if node.failed_phase == phase:
        return "failed"
    if (node.is_head and phase in HEAD_SKIPS) or (node.idle and phase in ("push", "launch", "load", "ready")):
        return "skipped"
    order = ev.PHASES.index(phase)
    reached = ev.PHASES.index(node.phase) if node.phase in ev.PHASES else -1
    if phase == "probe" and node.facts is not None:
        return "done"
    if node.failed_phase is not None and order > ev.PHASES.index(node.failed_phase):
        return "pending"
    if order < reached or node.phase == "ready":
        return "done"
    if order == reached:
        return "active"
    return "pending"


def phase_cell(node: NodeState, phase: str) -> tuple[str, str]:
    """(text, state) for the phase's column."""
    state = phase_state(node, phase)
    moved = node.transfers.get(phase)
    if state == "failed":
        return "✗ failed", state
    if state == "skipped":
        return ("local" if node.is_head else "—"), state
    load = node.load if phase == "load" else None
    if state == "done":
        if load is not None:
            return f"✓ {load_done(load.done_bytes, load.sent_bytes)}", state
        if phase in TRANSFER_PHASES and moved:
            return f"✓ {format_size(moved[0])}", state
        return "✓", state
    if state == "active":
        if load is not None:
            total = moved[1] if moved else None
            text = load_transfer(load.done_bytes, total, load.sent_bytes, load.rate, load.eta_seconds)
            return f"◐ {text}", state
        if phase in TRANSFER_PHASES and moved:
            return f"◐ {transfer(*moved)}", state
        return "◐ …", state
    return "·", state


def detail(node: NodeState) -> tuple[str, str]:
    if node.reason:
        return node.reason, "failed"
    if node.idle:
        return "holds no layers", "skipped"
    if node.building:
        return node.building, "pending"
    if node.phase in ("launch", "load", "ready") and node.agent_pid is not None:
        return f"agent pid {node.agent_pid}", "pending"
    return describe_facts(node.facts or {}), "pending"


def describe_facts(facts: Mapping[str, Any]) -> str:
    parts = [str(facts.get("hostname", "")), f"{facts.get('cores', '?')} cores"]
    if facts.get("mem_available"):
        parts.append(f"{format_size(int(facts['mem_available']))} free")
    if facts.get("gpus"):
        parts.append(f"{len(facts['gpus'])} GPU")
    return " · ".join(p for p in parts if p)


class ProvisioningView(Vertical):
    """Bringing the mesh up: per node a row of phases, the planned split, and how it ended."""

    COMPONENT_CLASSES = {
        "provisioning--done", "provisioning--active", "provisioning--pending",
        "provisioning--failed", "provisioning--skipped", "provisioning--node",
    }

    class EventArrived(Message):
        """A core event about provisioning. Byte counts of one transfer supersede each other."""

        def __init__(self, event: ev.Event) -> None:
            super().__init__()
            self.event = event

        def can_replace(self, message: Message) -> bool:
            mine, other = self.event, getattr(message, "event", None)
            return (isinstance(mine, ev.TransferProgressed) and isinstance(other, ev.TransferProgressed)
                    and (mine.host, mine.phase) == (other.host, other.phase))

    def __init__(self, state: Callable[[], MeshState], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.state = state
        self._throttle = Throttle(self, 0.1, self._redraw)
        self._stage = -1  # the furthest phase any node reached, for the status line

    def compose(self) -> ComposeResult:
        yield DataTable(id="provisioning-table", cursor_type="none", zebra_stripes=False)
        yield SplitBar(self.state, id="provisioning-split")
        yield Static("", id="provisioning-status")

    def on_mount(self) -> None:
        self.border_title = "Bringing the mesh up"
        columns = [("node", "node"), *((phase, phase) for phase in ev.PHASES), ("detail", "detail")]
        self._rows = TableSync(self.query_one(DataTable), columns)
        self._redraw()
        self.set_status("reading the model…")

    @on(EventArrived)
    def _on_event(self, message: EventArrived) -> None:
        event = message.event
        if isinstance(event, ev.PlanComputed):
            self.query_one(SplitBar).refresh()
            return
        if isinstance(event, ev.ModelLoaded):
            self.set_status(f"model loaded: {format_size(event.bytes_sent)} sent to the hosts in "
                            f"{event.seconds:.1f} s")
            return
        if isinstance(event, ev.HostPhaseChanged) and event.phase in STAGE_STATUS:
            stage = ev.PHASES.index(event.phase)
            if stage > self._stage:
                self._stage = stage
                self.set_status(STAGE_STATUS[event.phase])
        if isinstance(event, ev.HostFailed | ev.StageFailed):
            self.query_one(SplitBar).refresh()
        self._throttle.poke()

    def set_status(self, text: str, *, failed: bool = False) -> None:
        status = self.query_one("#provisioning-status", Static)
        status.update(Text(text))
        status.set_class(failed, "-failed")

    def _redraw(self) -> None:
        for node in self.state().nodes:
            self._rows.show(node.name, self._cells(node))

    def _cells(self, node: NodeState) -> list[Text]:
        cells = [Text(node.name, style=self.get_component_rich_style("provisioning--node"))]
        for phase in ev.PHASES:
            text, state = phase_cell(node, phase)
            cells.append(Text(text, style=self.get_component_rich_style(f"provisioning--{state}")))
        text, state = detail(node)
        cells.append(Text(text, style=self.get_component_rich_style(f"provisioning--{state}")))
        return cells
