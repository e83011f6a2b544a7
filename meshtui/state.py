"""The mesh as its events tell it: `apply(state, event) -> state`, pure, over frozen dataclasses.

The orchestrator reports every step as a past-tense event (`meshtui.events`); folding them gives everything a
view needs: each node's status, phase, layers, transfers, round trip and per-token latencies, the plan, the
load, the recoveries, the replies in flight, and whether a reply can start (`is_ready`, the one definition).
The TUI, `up --json` and the API read this state, never the orchestrator's working objects.

Events this module does not know (added by other parts later) leave the state as it is.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from meshtui import events as ev
from meshtui.planner import Plan
from meshtui.stats import p95

HEAD = "head"  # the head's node name (meshtui.capacity.HEAD_NAME)
HEAD_ADDRESS = "127.0.0.1"
LATENCY_HISTORY = 256  # per-token samples kept per node
STOPPED = "stopped"
FAILED = "failed"


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class NodeState:
    name: str
    address: str
    is_head: bool = False
    status: str = "pending"  # a phase of ev.PHASES, "idle", "stalled", "failed" or "stopped"
    reason: str = ""  # why it failed, in words a user can act on
    phase: str | None = None  # the last provisioning phase it entered (ev.PHASES)
    failed_phase: str | None = None  # the phase it failed in ("ready": after it was up)
    idle: bool = False  # the plan gave it no layers
    building: str = ""  # a runtime build on the host, while it runs ("build: compiling 42%")
    facts: Mapping[str, Any] | None = None  # its probe's answer
    agent_pid: int | None = None
    devices: tuple[str, ...] = ()
    transfers: Mapping[str, tuple[int, int | None]] = field(default_factory=lambda: _frozen({}))  # phase -> done, total
    load: ev.TransferProgressed | None = None  # the last word on the model load: in place, sent, rate, ETA
    layers: tuple[int, int] | None = None
    usable_bytes: int = 0
    planned_bytes: int = 0
    device: str = "cpu"
    rtt_ms: float | None = None
    latencies: tuple[ev.StageLatencyMeasured, ...] = ()  # the last LATENCY_HISTORY tokens' samples

    def latency_summary(self) -> dict[str, float | None]:
        values = [x.total_ms for x in self.latencies]
        if not values:
            return {"last": None, "mean": None, "p95": None, "network": self.rtt_ms}
        return {"last": values[-1], "mean": statistics.fmean(values), "p95": p95(values), "network": self.rtt_ms}

    def bytes_per_token(self) -> float | None:
        if not self.latencies:
            return None
        return statistics.fmean(x.bytes_up + x.bytes_down for x in self.latencies)


@dataclass(frozen=True)
class ReplyState:
    """A reply in flight."""

    request_id: int
    source: str = ""
    prompt_tokens: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class RecoveryState:
    host: str
    token_index: int
    seconds: float
    stalled_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"node": self.host, "token_index": self.token_index, "seconds": self.seconds,
                "stalled_seconds": self.stalled_seconds}


@dataclass(frozen=True)
class MeshState:
    nodes: tuple[NodeState, ...]  # the head first, then the hosts in the inventory's order
    plan: Plan | None = None
    loaded: bool = False  # an engine holds the model as planned
    recovering: bool = False
    closed: bool = False
    up: bool = False  # the mesh came up once (MeshReady)
    load_seconds: float = 0.0
    load_bytes_sent: int = 0
    load_by_host: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _frozen({}))
    step_costs_ms: tuple[float, ...] = ()  # a step of 1, 2, ... positions after the load (drafting's prices)
    placement: Mapping[str, Sequence[int]] = field(default_factory=lambda: _frozen({}))
    recoveries: tuple[RecoveryState, ...] = ()
    replies: Mapping[int, ReplyState] = field(default_factory=lambda: MappingProxyType({}))  # in flight, by id
    last_reply: ev.ReplyFinished | None = None

    def node(self, name: str) -> NodeState:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def hosts(self) -> tuple[NodeState, ...]:
        return self.nodes[1:]

    def failed_hosts(self) -> list[str]:
        return [n.name for n in self.hosts if n.status == FAILED]


def initial_state(hosts: Iterable[tuple[str, str]]) -> MeshState:
    """Before any event: the head and each (name, address) host, pending."""
    return MeshState((NodeState(HEAD, HEAD_ADDRESS, is_head=True),
                      *(NodeState(name, address) for name, address in hosts)))


def is_ready(state: MeshState) -> bool:
    """Whether a reply can start now: a loaded model, no recovery under way, not torn down. The one definition."""
    return state.loaded and not state.recovering and not state.closed


def fold(state: MeshState, events: Iterable[ev.Event]) -> MeshState:
    for event in events:
        state = apply(state, event)
    return state


def apply(state: MeshState, event: ev.Event) -> MeshState:
    """The state after `event`. Pure; an event about an unknown node, or of an unknown kind, changes nothing."""
    if state.closed and not isinstance(event, ev.LogRecorded):
        return _apply_after_close(state, event)
    match event:
        case ev.PlanComputed(plan=plan) if isinstance(plan, Plan):
            return _with_plan(state, plan)
        case ev.ModelLoaded(seconds=seconds, bytes_sent=sent, placement=placement, by_host=by_host, step_ms=step_ms):
            return replace(state, loaded=True, load_seconds=seconds, load_bytes_sent=sent,
                           placement=_frozen({k: tuple(v) for k, v in placement.items()}),
                           load_by_host=_frozen(dict(by_host)), step_costs_ms=tuple(step_ms))
        case ev.EngineStopped():
            return replace(state, loaded=False)
        case ev.MeshReady():
            return replace(state, up=True)
        case ev.MeshRecovering(host=host):
            return _on_node(replace(state, recovering=True), host, lambda n: replace(n, layers=None))
        case ev.MeshRecovered(host=host, token_index=index, seconds=seconds, stalled_seconds=stalled):
            return replace(state, recovering=False,
                           recoveries=(*state.recoveries, RecoveryState(host, index, seconds, stalled)))
        case ev.RecoveryFailed():
            return replace(state, recovering=False)
        case ev.MeshClosed():
            nodes = tuple(n if n.status == FAILED else replace(n, status=STOPPED) for n in state.nodes)
            return replace(state, nodes=nodes, closed=True, loaded=False, recovering=False,
                           replies=MappingProxyType({}))
        case ev.ReplyStarted(request_id=rid, prompt_tokens=prompt_tokens):
            return _with_reply(state, rid, ReplyState(rid, event.source, prompt_tokens))
        case ev.TokenGenerated(request_id=rid, token_id=token_id) if rid in state.replies and token_id >= 0:
            reply = state.replies[rid]
            return _with_reply(state, rid, replace(reply, tokens=reply.tokens + 1))
        case ev.ReplyFinished(request_id=rid):
            return replace(_with_reply(state, rid, None), last_reply=event)
        case ev.ReplyFailed(request_id=rid):
            return _with_reply(state, rid, None)
    about = getattr(event, "host", None)  # every event about one node names it in `host`
    if not isinstance(about, str):
        return state
    return _on_node(state, about, lambda node: apply_to_node(node, event))


def apply_to_node(node: NodeState, event: ev.Event) -> NodeState:
    """One node's part of an event about it."""
    match event:
        case ev.HostPhaseChanged(phase="idle"):
            return replace(node, status="idle", idle=True)
        case ev.HostPhaseChanged(phase=phase, detail=detail, building=is_building):
            building = detail if is_building else ""
            return replace(node, status=phase, phase=phase, building=building, idle=False)
        case ev.HostProbed(facts=facts):
            return replace(node, facts=_frozen(facts))
        case ev.TransferProgressed(phase=phase, done_bytes=done, total_bytes=total):
            known_total = total if total is not None else node.transfers.get(phase, (0, None))[1]
            return replace(node, transfers=_frozen({**node.transfers, phase: (done, known_total)}),
                           load=event if phase == "load" else node.load)
        case ev.AgentLaunched(pid=pid, devices=devices):
            return replace(node, agent_pid=pid, devices=tuple(devices))
        case ev.HostFailed(phase=phase, reason=reason):
            # a phase outside PHASES ("serve") means it was lost after it was up
            return replace(node, status=FAILED, reason=reason,
                           failed_phase=phase if phase in ev.PHASES else "ready")
        case ev.StageFailed(reason=reason):
            return replace(node, status=FAILED, reason=reason, failed_phase=node.failed_phase or "ready")
        case ev.StageStalled() if node.status != FAILED:
            return replace(node, status="stalled")
        case ev.StageResponsive() if node.status == "stalled":
            return replace(node, status="load" if node.phase == "load" else "ready")
        case ev.HostRejoined():
            return replace(node, reason="", failed_phase=None, status="ready" if node.status == FAILED else node.status)
        case ev.RoundTripMeasured(rtt_ms=rtt):
            return replace(node, rtt_ms=rtt)
        case ev.StageLatencyMeasured():
            return replace(node, latencies=(*node.latencies, event)[-LATENCY_HISTORY:])
    return node


def _apply_after_close(state: MeshState, event: ev.Event) -> MeshState:
    """Torn down is final: late events (a reply's end, a stage's last words) change only the replies."""
    if isinstance(event, ev.ReplyFinished | ev.ReplyFailed):
        return _with_reply(state, event.request_id, None)
    return state


def _on_node(state: MeshState, name: str, change: Callable[[NodeState], NodeState]) -> MeshState:
    nodes = tuple(change(n) if n.name == name else n for n in state.nodes)
    return state if nodes == state.nodes else replace(state, nodes=nodes)


def _with_plan(state: MeshState, plan: Plan) -> MeshState:
    by_name = {a.name: a for a in plan.assignments}
    nodes = []
    for node in state.nodes:
        a = by_name.get(node.name)
        if a is None:
            nodes.append(replace(node, layers=None))
        else:
            nodes.append(replace(node, layers=(a.start, a.end) if a.n_layers else None, usable_bytes=a.usable_bytes,
                                 planned_bytes=a.used_bytes, device=a.device))
    return replace(state, plan=plan, nodes=tuple(nodes))


def _with_reply(state: MeshState, rid: int, reply: ReplyState | None) -> MeshState:
    replies = dict(state.replies)
    if reply is None:
        if rid not in replies:
            return state
        del replies[rid]
    else:
        replies[rid] = reply
    return replace(state, replies=MappingProxyType(replies))
