"""Predict decode speed for a plan, before running it. Pure: facts in, numbers out.

Decoding one token on a CPU reads every weight of a node's layers once, so a node's compute time is about
its bytes over its memory bandwidth (measured at probe as the speed one core copies memory). Each stage adds
one round trip per token (the RPC framing: FINDINGS.md). So

    seconds per token = sum over nodes of bytes_read / (bandwidth * EFFICIENCY) + sum over stages of RTT
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshtui.gguf_facts import ModelFacts
from meshtui.planner import Plan

# Share of the copy bandwidth llama.cpp's CPU decode achieves. Calibrated on the development machine
# (SmolLM2 Q4_1 alone: 76-80 tok/s against 9.4 GB/s copy speed, reading ~92 MB per token); see
# docs/performance.md. A fixed constant: the prediction is shown beside the measurement, never trusted alone.
EFFICIENCY = 0.8


@dataclass(frozen=True)
class NodePrediction:
    name: str
    bytes_per_token: int  # weights read per token
    compute_ms: float
    network_ms: float  # one round trip per token for a stage; 0 for the head


@dataclass(frozen=True)
class Prediction:
    nodes: tuple[NodePrediction, ...]

    @property
    def token_ms(self) -> float:
        return sum(n.compute_ms + n.network_ms for n in self.nodes)

    @property
    def tokens_per_second(self) -> float:
        return 1000.0 / self.token_ms if self.token_ms > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "tokens_per_second": self.tokens_per_second,
            "nodes": [{"name": n.name, "compute_ms": n.compute_ms, "network_ms": n.network_ms,
                       "bytes_per_token": n.bytes_per_token} for n in self.nodes],
        }


def _bytes_read(model: ModelFacts, layers: list[int]) -> int:
    """Weights a node reads per decoded token for its layers; layer n_layer is the output."""
    return sum(model.output_bytes if layer == model.n_layer else model.layer_weight_bytes[layer] for layer in layers)


def predict_decode(
    plan: Plan,
    model: ModelFacts,
    bandwidth: Mapping[str, float | None],
    rtt_ms: Mapping[str, float | None],
) -> Prediction | None:
    """None when a node holding layers has no bandwidth measurement."""
    nodes = []
    for a in plan.assignments:
        layers = plan.layers_of(a.name)
        if not layers:
            continue
        speed = bandwidth.get(a.name)
        if not speed:
            return None
        read = _bytes_read(model, layers)
        network = 0.0 if a.is_head else float(rtt_ms.get(a.name) or 0.0)
        nodes.append(NodePrediction(a.name, read, read / (speed * EFFICIENCY) * 1000.0, network))
    return Prediction(tuple(nodes))
