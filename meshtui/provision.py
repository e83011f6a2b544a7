"""One node's steps up to serving: connect and probe, start its stage (agent and tunnel), keep its round trip.

Each step changes the node and tells through the `NodeSink`; a failure marks the node failed with the reason
and raises the `HostError` (host and reason as fields) for the orchestrator's sequence to handle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from meshtui import events as ev
from meshtui.capacity import gpu_verdict
from meshtui.errors import HostError
from meshtui.node import Node, NodeSink
from meshtui.runtime import RuntimeBundle
from meshtui.stage import Stage

RTT_INTERVAL = 2.0


async def connect_node(node: Node, stage: Stage, sink: NodeSink, *, accept_new: bool) -> None:
    """Connect to the node's host and probe it; its facts land on the node."""
    try:
        facts = await stage.connect_and_probe(accept_new=accept_new)
    except HostError as err:
        sink.fail(node, node.status, err.reason)
        raise
    node.facts = facts
    sink.emit(ev.HostProbed(node.name, facts.to_json()))
    verdict = gpu_verdict(stage.spec, facts)
    if facts.gpus and not verdict.serves:
        sink.log(node.name, f"its GPU is not used: {verdict.why_not}; its layers go to the CPU", "warning")


def serves_gpu(node: Node, stage: Stage) -> bool:
    return node.facts is not None and gpu_verdict(stage.spec, node.facts).serves


async def start_stage(node: Node, stage: Stage, bundle: RuntimeBundle, sink: NodeSink) -> None:
    """Push the runtime, launch the agent, open the tunnel."""
    try:
        await stage.start(bundle, gpu=serves_gpu(node, stage))
    except HostError as err:
        sink.fail(node, node.status, err.reason)
        raise
    agent = stage.running_agent()
    devices = tuple(d.get("description") or d.get("name", "") for d in agent.devices)
    sink.emit(ev.AgentLaunched(node.name, agent.socket_path, agent.pid, devices))
    await stage.open_tunnel()
    _take_rtt(node, stage, sink)


def _take_rtt(node: Node, stage: Stage, sink: NodeSink) -> None:
    rtt = stage.rtt_ms
    if rtt is not None and rtt != node.rtt_ms:
        sink.emit(ev.RoundTripMeasured(node.name, rtt))
    node.rtt_ms = rtt


async def measure_rtt_forever(hosts: Sequence[Node], stages: Mapping[str, Stage], sink: NodeSink,
                              interval: float = RTT_INTERVAL) -> None:
    while True:
        for node in hosts:
            stage = stages[node.name]
            await stage.ping()
            _take_rtt(node, stage, sink)
        await asyncio.sleep(interval)
