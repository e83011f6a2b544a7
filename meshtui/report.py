"""What the orchestrator reports about its nodes: the per-node summary (`--json`, the TUI) and the prediction."""

from __future__ import annotations

from typing import Any

from meshtui.gguf_facts import ModelFacts
from meshtui.predict import Prediction, predict_decode
from meshtui.runtime import agent_source_path, load_file_module
from meshtui.state import MeshState


def predict(state: MeshState, model: ModelFacts | None) -> Prediction | None:
    """Predicted decode speed of the plan from probed bandwidth and measured round trips, as the events told."""
    if state.plan is None or model is None:
        return None
    bandwidth = {n.name: (n.facts.get("mem_bandwidth") if n.facts else None) for n in state.nodes}
    return predict_decode(state.plan, model, bandwidth, {n.name: n.rtt_ms for n in state.nodes})


def summary(state: MeshState) -> list[dict[str, Any]]:
    """Each node as `up --json` reports it (`nodes[]`), read from the state the events built."""
    rows = []
    for node in state.nodes:
        lat = node.latency_summary()
        rows.append({
            "name": node.name,
            "address": node.address,
            "status": node.status,
            "reason": node.reason or None,
            "layers": list(node.layers) if node.layers else None,
            "usable_bytes": node.usable_bytes,
            "planned_bytes": node.planned_bytes,
            "device": node.device,
            "latency_ms": {"last": lat["last"], "mean": lat["mean"], "p95": lat["p95"]},
            "network_rtt_ms": lat["network"],
            "bytes_per_token": node.bytes_per_token(),
        })
    return rows


def probe_head() -> dict[str, Any]:
    """The head is probed by the same code as the hosts, run in-process."""
    result: dict[str, Any] = load_file_module(agent_source_path(), "meshtui_agent_local").probe()
    return result
