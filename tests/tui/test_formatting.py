"""Pure helpers of the views: how layers, latencies and provisioning states read."""

from __future__ import annotations

from meshtui import events as ev
from meshtui.state import NodeState, apply_to_node
from meshtui.tui.formatting import latency_columns, layer_range, proportional_widths, replies_in_flight
from meshtui.tui.provisioning import detail, phase_cell, phase_state


def test_layer_ranges_name_the_output_layer():
    assert layer_range((0, 13), 30) == "0–12"
    assert layer_range((25, 31), 30) == "25–29+out"
    assert layer_range((29, 31), 30) == "29+out"
    assert layer_range((30, 31), 30) == "out"
    assert layer_range(None, 30) == "—"


def test_latency_columns_split_compute_and_network_per_sample():
    samples = [ev.StageLatencyMeasured("a", i, total, 2.0, 1, 1) for i, total in enumerate((10.0, 20.0, 1.5))]
    last, mean, p95 = latency_columns(samples)
    assert last == "1.5 (0.0+1.5)"  # network never exceeds the total
    assert mean == "10.5 (8.7+1.8)"
    assert p95 == "20.0 (18.0+2.0)"
    assert latency_columns([]) == ["—", "—", "—"]


def test_proportional_widths_fill_the_bar_exactly():
    assert proportional_widths([13, 12, 6], 100) == [42, 39, 19]
    assert sum(proportional_widths([1, 1000], 10)) == 10 and proportional_widths([1, 1000], 10)[0] == 1
    assert proportional_widths([0, 5], 7) == [0, 7]


def fold_node(node: NodeState, *events: ev.Event) -> NodeState:
    for event in events:
        node = apply_to_node(node, event)
    return node


def test_host_progress_marks_phases_done_active_failed():
    host = fold_node(NodeState("lab1", "10.0.0.2"), ev.HostPhaseChanged("lab1", "connect"),
                     ev.HostPhaseChanged("lab1", "probe"),
                     ev.HostProbed("lab1", {"hostname": "h", "cores": 4, "mem_available": 2**30}),
                     ev.HostPhaseChanged("lab1", "push"), ev.TransferProgressed("lab1", "push", 512, 1024))
    assert [phase_state(host, p) for p in ev.PHASES] == ["done", "done", "active", "pending", "pending", "pending"]
    assert phase_cell(host, "push") == ("◐ 512 B / 1.00 KiB 50%", "active")
    host = fold_node(host, ev.HostFailed("lab1", "push", "disk full"))
    assert phase_cell(host, "push") == ("✗ failed", "failed")
    assert detail(host) == ("disk full", "failed")
    head = fold_node(NodeState("head", "127.0.0.1", is_head=True), ev.HostProbed("head", {"cores": 2}))
    assert [phase_cell(head, p)[0] for p in ev.PHASES] == ["local", "✓", "local", "local", "·", "·"]


def test_a_build_on_the_host_shows_its_progress_until_the_launch() -> None:
    host = fold_node(NodeState("gpu1", "192.0.2.7"),
                     ev.HostProbed("gpu1", {"hostname": "gpu1", "cores": 16, "gpus": [{"name": "H200"}]}))
    assert detail(host) == ("gpu1 · 16 cores · 1 GPU", "pending")
    # A push whose detail merely reads like a build is not one: the event says so, the text is not parsed.
    host = fold_node(host, ev.HostPhaseChanged("gpu1", "push", "build-1.tar: 2.6 MB"))
    assert detail(host) == ("gpu1 · 16 cores · 1 GPU", "pending")
    host = fold_node(host, ev.HostPhaseChanged("gpu1", "push", "build: compiling (cuda)", building=True),
                     ev.HostPhaseChanged("gpu1", "push", "build: compiling 42%", building=True))
    assert detail(host) == ("build: compiling 42%", "pending")
    assert phase_cell(host, "push") == ("◐ …", "active")
    host = fold_node(host, ev.HostPhaseChanged("gpu1", "launch"))
    assert detail(host) == ("gpu1 · 16 cores · 1 GPU", "pending")


def test_replies_in_flight_count_by_source() -> None:
    assert replies_in_flight(()) == ""
    assert replies_in_flight(("chat",)) == "1 in flight: chat"
    assert replies_in_flight(("chat", "api", "api", "")) == "4 in flight: api 2, chat, other"


def test_a_reply_with_verified_drafts_says_how_many_tokens_each_round_trip_brought() -> None:
    from meshtui.tui.chat import describe_reply

    spec = ev.Speculation("auto", drafted=18, accepted=13, verify_steps=4, decode_steps=5, tokens=17)
    finished = ev.ReplyFinished(1, "x", tuple(range(17)), 0.5, 30.0, "stop", speculative=spec)
    assert describe_reply(finished) == "30.0 tok/s · 17 tokens · 0.50 s · 3.4 tokens/round trip (13/18 drafts kept)"
    plain = ev.ReplyFinished(1, "x", (1, 2), 0.5, 30.0, "stop", speculative=ev.Speculation("off", decode_steps=2,
                                                                                           tokens=2))
    assert describe_reply(plain) == "30.0 tok/s · 2 tokens · 0.50 s"
