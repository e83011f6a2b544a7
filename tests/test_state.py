"""The state the views read, folded from the core's events: examples, then properties under any event order."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from meshtui import events as ev
from meshtui.planner import NodeAssignment, Plan
from meshtui.state import LATENCY_HISTORY, MeshState, apply, fold, initial_state, is_ready

HOSTS = (("h1", "198.51.100.11"), ("h2", "198.51.100.12"))
NAMES = ("head", "h1", "h2", "ghost")  # "ghost" is in no inventory: its events change nothing


def plan(h1_layers: int = 10) -> Plan:
    head = NodeAssignment("head", 0, 10, 1000, 10, 5000, True)
    h1 = NodeAssignment("h1", 10, 10 + h1_layers, 1000, 10, 5000, False)
    h2 = NodeAssignment("h2", 10 + h1_layers, 31, 1000, 10, 5000, False, device="CUDA0")
    return Plan(30, 512, (head, h1, h2), ("because",), output_on_head=True)


def up_events() -> list[ev.Event]:
    events: list[ev.Event] = [ev.HostProbed("head", {"cores": 2})]
    for host, _ in HOSTS:
        events += [ev.HostPhaseChanged(host, "connect", "x:22"), ev.HostProbed(host, {"cores": 2}),
                   ev.HostPhaseChanged(host, "probe")]
    events.append(ev.PlanComputed(plan()))
    for host, _ in HOSTS:
        events += [ev.HostPhaseChanged(host, "push"), ev.TransferProgressed(host, "push", 5, 10),
                   ev.TransferProgressed(host, "push", 10, None), ev.HostPhaseChanged(host, "launch"),
                   ev.AgentLaunched(host, "/run/s.sock", 77, ("CPU",)), ev.RoundTripMeasured(host, 0.4)]
    events += [ev.HostPhaseChanged(n, "load") for n in ("h1", "h2", "head")]
    events.append(ev.ModelLoaded(1.5, 99, {"head": [0, 1], "h1": [10], "h2": [20, 30]},
                                 {"h1": {"bytes_sent": 60}, "h2": {"bytes_sent": 39}}, (9.5, 15.0, 18.5, 18.0)))
    events += [ev.HostPhaseChanged(n, "ready") for n in ("head", "h1", "h2")]
    events.append(ev.MeshReady())
    return events


def start() -> MeshState:
    return initial_state(HOSTS)


def test_bringing_the_mesh_up_gives_each_node_its_layers_transfers_and_round_trip() -> None:
    state = fold(start(), up_events())
    assert is_ready(state) and state.up
    assert [(n.name, n.status, n.layers) for n in state.nodes] == [
        ("head", "ready", (0, 10)), ("h1", "ready", (10, 20)), ("h2", "ready", (20, 31))]
    h2 = state.node("h2")
    assert (h2.device, h2.agent_pid, h2.devices, h2.rtt_ms) == ("CUDA0", 77, ("CPU",), 0.4)
    assert dict(h2.transfers) == {"push": (10, 10)}  # a total said once is kept
    assert dict(state.placement) == {"head": (0, 1), "h1": (10,), "h2": (20, 30)}
    assert (state.load_seconds, state.load_bytes_sent) == (1.5, 99)
    assert dict(state.load_by_host) == {"h1": {"bytes_sent": 60}, "h2": {"bytes_sent": 39}}
    assert state.step_costs_ms == (9.5, 15.0, 18.5, 18.0)


def test_a_lost_stage_makes_the_mesh_unready_until_it_recovered() -> None:
    state = fold(start(), up_events())
    state = fold(state, [ev.HostFailed("h1", "serve", "agent exited: killed by signal 9"),
                         ev.StageFailed("h1", "agent exited: killed by signal 9"), ev.MeshRecovering("h1", "x"),
                         ev.EngineStopped("reloading")])
    h1 = state.node("h1")
    assert (h1.status, h1.reason, h1.failed_phase, h1.layers) == (
        "failed", "agent exited: killed by signal 9", "ready", None)
    assert not is_ready(state) and state.failed_hosts() == ["h1"]
    state = fold(state, [ev.PlanComputed(plan(0)), ev.ModelLoaded(0.5, 0, {}), ev.MeshRecovered("h1", 9, 0.7, 1.5)])
    assert is_ready(state)
    assert [(r.host, r.token_index, r.stalled_seconds) for r in state.recoveries] == [("h1", 9, 1.5)]
    state = apply(state, ev.HostRejoined("h1"))
    assert (state.node("h1").reason, state.node("h1").failed_phase) == ("", None)


def test_a_failed_recovery_leaves_it_unready_and_not_recovering() -> None:
    state = fold(start(), [*up_events(), ev.MeshRecovering("h1", "x"), ev.EngineStopped("reloading"),
                           ev.RecoveryFailed("h1", "cannot hold the model")])
    assert not state.recovering and not is_ready(state)


def test_replies_in_flight_are_counted_and_leave_when_they_end() -> None:
    state = fold(start(), [*up_events(), ev.ReplyStarted(1, 12, "chat"), ev.ReplyStarted(2, 5, "api"),
                           ev.TokenGenerated(1, 0, 42, "a"), ev.TokenGenerated(1, 1, -1, ""),
                           ev.TokenGenerated(2, 0, 43, "b")])
    assert [(r.request_id, r.source, r.tokens) for r in state.replies.values()] == [(1, "chat", 1), (2, "api", 1)]
    finished = ev.ReplyFinished(1, "a", (42,), 0.1, 10.0, "stop")
    state = fold(state, [finished, ev.ReplyFailed(2, "gone")])
    assert dict(state.replies) == {} and state.last_reply == finished


def test_latency_history_is_bounded_and_keeps_the_newest() -> None:
    samples = [ev.StageLatencyMeasured("head", i, float(i), 0.0, 0, 0) for i in range(LATENCY_HISTORY + 10)]
    node = fold(start(), samples).node("head")
    assert len(node.latencies) == LATENCY_HISTORY and node.latencies[-1].token_index == LATENCY_HISTORY + 9
    assert node.latency_summary()["last"] == LATENCY_HISTORY + 9


def test_closing_is_final() -> None:
    state = fold(start(), [*up_events(), ev.HostFailed("h2", "serve", "gone"), ev.MeshClosed()])
    assert [n.status for n in state.nodes] == ["stopped", "stopped", "failed"]
    assert apply(state, ev.ModelLoaded(1.0, 0, {})) == state and not is_ready(state)


@dataclass(frozen=True)
class SomethingNew(ev.Event):
    """An event another part adds later: folded harmlessly."""

    host: str = "h1"
    value: int = 3


def test_unknown_events_change_nothing() -> None:
    state = fold(start(), up_events())
    assert apply(state, SomethingNew()) == state and apply(state, ev.LogRecorded("x", "y")) == state


# -- properties -------------------------------------------------------------------------------------------
names = st.sampled_from(NAMES)
reasons = st.sampled_from(("", "agent exited: killed by signal 9", "SSH connection lost"))
events = st.one_of(
    st.builds(ev.HostPhaseChanged, names, st.sampled_from((*ev.PHASES, "idle")), st.sampled_from(("", "build: 4%")),
              st.booleans()),
    st.builds(ev.HostProbed, names, st.just({"cores": 2})),
    st.builds(ev.TransferProgressed, names, st.sampled_from(("push", "load")), st.integers(0, 100),
              st.none() | st.integers(0, 100)),
    st.builds(ev.AgentLaunched, names, st.just("/s"), st.integers(1, 9)),
    st.builds(ev.HostFailed, names, st.sampled_from((*ev.PHASES, "serve")), reasons),
    st.builds(ev.StageFailed, names, reasons),
    st.builds(ev.StageStalled, names, st.floats(0, 9)),
    st.builds(ev.StageResponsive, names),
    st.builds(ev.PlanComputed, st.integers(0, 21).map(plan)),
    st.builds(ev.ModelLoaded, st.floats(0, 9), st.integers(0, 99)),
    st.builds(ev.EngineStopped, reasons),
    st.builds(ev.MeshReady),
    st.builds(ev.MeshRecovering, names, reasons),
    st.builds(ev.MeshRecovered, names, st.integers(0, 9), st.floats(0, 9)),
    st.builds(ev.RecoveryFailed, names, reasons),
    st.builds(ev.HostRejoined, names),
    st.builds(ev.RoundTripMeasured, names, st.floats(0, 9)),
    st.builds(ev.StageLatencyMeasured, names, st.integers(0, 9), st.floats(0, 9), st.floats(0, 9),
              st.integers(0, 9), st.integers(0, 9)),
    st.builds(ev.ReplyStarted, st.integers(1, 4), st.integers(0, 9), st.sampled_from(("chat", "api"))),
    st.builds(ev.TokenGenerated, st.integers(1, 4), st.integers(0, 9), st.integers(-1, 9), st.just("t")),
    st.builds(ev.ReplyFinished, st.integers(1, 4), st.just("t"), st.just((1,)), st.floats(0, 9), st.floats(0, 9),
              st.just("stop")),
    st.builds(ev.ReplyFailed, st.integers(1, 4), reasons),
    st.builds(ev.MeshClosed),
    st.builds(ev.LogRecorded, names, st.just("m")),
    st.builds(SomethingNew, names),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=60))
def test_any_order_keeps_the_invariants(sequence: list[ev.Event]) -> None:
    state = start()
    closed = False
    for event in sequence:
        state = apply(state, event)
        closed = closed or isinstance(event, ev.MeshClosed)
        assert [n.name for n in state.nodes] == ["head", "h1", "h2"]  # nodes never come or go, nor reorder
        assert state.nodes[0].is_head and not any(n.is_head for n in state.hosts)
        assert all(len(n.latencies) <= LATENCY_HISTORY for n in state.nodes)
        assert all(n.failed_phase is not None for n in state.nodes if n.status == "failed")
        assert all(n.layers is None or n.layers[0] < n.layers[1] for n in state.nodes)
        assert all(r.tokens >= 0 and rid == r.request_id for rid, r in state.replies.items())
        assert state.closed == closed  # torn down is final
        if closed:
            assert not is_ready(state) and not state.replies
            assert all(n.status in ("stopped", "failed") for n in state.nodes)
        # "ready" is a function of the state alone: no hidden flag, no clock
        assert is_ready(state) == (state.loaded and not state.recovering and not state.closed)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=60))
def test_folding_is_deterministic(sequence: list[ev.Event]) -> None:
    assert fold(start(), sequence) == fold(start(), sequence)
    assert is_ready(fold(start(), sequence)) == is_ready(fold(start(), list(sequence)))


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=40), st.lists(st.builds(SomethingNew, names) | st.builds(ev.LogRecorded, names,
                                                                                         st.just("m"))))
def test_events_it_does_not_know_are_folded_harmlessly(sequence: list[ev.Event], noise: list[ev.Event]) -> None:
    state = fold(start(), sequence)
    assert fold(state, noise) == state
