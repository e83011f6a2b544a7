"""A plan and what it costs: the planner's input and output types, each node's bytes (weights, KV cache,
compute buffers), and the one-line refusal when the model cannot fit.

The split itself (which node holds which layers) is `meshtui/planner.py`; this module only sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshtui.units import format_size

if TYPE_CHECKING:
    from meshtui.gguf_facts import ModelFacts

NODE_OVERHEAD_BYTES = 128 * 1024**2  # compute buffers etc.: paid by the head always, by others holding layers


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    usable_bytes: int  # memory the planner may use on this node
    is_head: bool = False
    device: str = "cpu"  # what holds its layers (and whose memory usable_bytes is): "cpu", "CUDA0 NVIDIA H200", ...


@dataclass(frozen=True)
class KvReserve:
    """The KV cache a plan reserves: `sequences` (replies decoded together) of `context` tokens each."""

    context: int
    sequences: int = 1

    @property
    def tokens(self) -> int:
        return self.context * self.sequences

    def __str__(self) -> str:
        if self.sequences == 1:
            return f"context {self.context}"
        return f"context {self.context} x {self.sequences} sequences"


@dataclass(frozen=True)
class NodeAssignment:
    name: str
    start: int  # first layer index, inclusive
    end: int  # exclusive; layer index n_layer is the output layer
    weight_bytes: int  # weights it will hold (the head's include the token embeddings)
    kv_bytes: int
    usable_bytes: int
    is_head: bool
    device: str = "cpu"

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def used_bytes(self) -> int:
        """Weights + KV cache + compute buffers; a node given no layers (other than the head) uses nothing."""
        if not self.is_head and self.n_layers == 0:
            return self.weight_bytes + self.kv_bytes
        return self.weight_bytes + self.kv_bytes + NODE_OVERHEAD_BYTES


@dataclass(frozen=True)
class Plan:
    n_layer: int  # the model's block count; layers are 0..n_layer, n_layer being the output layer
    context: int
    assignments: tuple[NodeAssignment, ...]  # head first, then the other nodes in the given order
    reasons: tuple[str, ...]
    # The output layer (index n_layer) stays on the head, served by a local stage registered after the
    # remote ones, so only hidden states cross the network; the logits (n_vocab floats a token) never do.
    output_on_head: bool = False
    parallel: int = 1  # sequences the KV cache holds at `context` tokens each (replies decoded together)

    @property
    def head(self) -> NodeAssignment:
        return self.assignments[0]

    @property
    def n_gpu_layers(self) -> int:
        """llama.cpp's n_gpu_layers: every layer not on the head's CPU."""
        return self.n_layer + 1 - self.head.n_layers

    @property
    def remote(self) -> tuple[NodeAssignment, ...]:
        """The nodes that become RPC devices, in device order (nodes given no layers are left out)."""
        return tuple(a for a in self.assignments[1:] if a.n_layers > 0)

    def layers_of(self, name: str) -> list[int]:
        """Every layer a node holds, the head's output layer included."""
        a = next(x for x in self.assignments if x.name == name)
        layers = list(range(a.start, a.end))
        return [*layers, self.n_layer] if a.is_head and self.output_on_head else layers

    def to_json(self) -> list[dict[str, object]]:
        return [
            {
                "name": a.name,
                "layers": [a.start, a.end],
                "output_layer": (a.is_head and self.output_on_head) or a.start <= self.n_layer < a.end,
                "weight_bytes": a.weight_bytes,
                "kv_bytes": a.kv_bytes,
                "usable_bytes": a.usable_bytes,
                "device": a.device,
            }
            for a in self.assignments
        ]


def assign_layers(model: ModelFacts, node: NodeCapacity, start: int, end: int, at: KvReserve) -> NodeAssignment:
    """What a node holding layers [start, end) holds and costs at the KV reserve `at`."""
    blocks = range(start, min(end, model.n_layer))
    weights = sum(model.layer_weight_bytes[i] for i in blocks)
    if start <= model.n_layer < end:
        weights += model.output_bytes
    if node.is_head:
        weights += model.input_bytes
    return NodeAssignment(
        name=node.name,
        start=start,
        end=end,
        weight_bytes=weights,
        kv_bytes=len(blocks) * model.kv_bytes_per_layer(at.tokens),
        usable_bytes=node.usable_bytes,
        is_head=node.is_head,
        device=node.device,
    )


def refusal(
    model: ModelFacts,
    nodes: Sequence[NodeCapacity],
    at: KvReserve,
    costs: Sequence[int],
    room: Sequence[int],
) -> str:
    """Why no contiguous whole-layer split fits, in one line naming the shortfall."""
    head = nodes[0]
    # Nodes that could take part at all: the head, and any other with more than its compute buffers.
    taking_part = [head, *(node for node in nodes[1:] if node.usable_bytes > NODE_OVERHEAD_BYTES)]
    kv_total = model.n_layer * model.kv_bytes_per_layer(at.tokens)
    buffers = NODE_OVERHEAD_BYTES * len(taking_part)
    need = model.weight_bytes + kv_total + buffers
    offer = sum(max(0, node.usable_bytes) for node in taking_part)
    if need > offer:
        count = f"{len(taking_part)} node" + ("s" if len(taking_part) != 1 else "")
        return (
            f"model needs {format_size(need)} (weights {format_size(model.weight_bytes)} + KV cache "
            f"{format_size(kv_total)} at {at} + compute buffers {format_size(buffers)}) "
            f"but the {count} offer {format_size(offer)} usable: short by {format_size(need - offer)}"
        )
    head_fixed = model.input_bytes + NODE_OVERHEAD_BYTES
    if head.usable_bytes < head_fixed:
        return (
            f"the head {head.name} must hold the token embeddings ({format_size(model.input_bytes)}) "
            f"and compute buffers ({format_size(NODE_OVERHEAD_BYTES)}) but offers "
            f"{format_size(head.usable_bytes)} usable: short by {format_size(head_fixed - head.usable_bytes)}"
        )
    biggest = max(range(len(costs)), key=lambda i: (costs[i], -i))
    roomiest = max(0, *room)
    if costs[biggest] > roomiest:
        what = "the output layer" if biggest == model.n_layer else f"layer {biggest}"
        return (
            f"{what} alone needs {format_size(costs[biggest])} at {at} but the most any "
            f"node can give to layers is {format_size(roomiest)}: "
            f"short by {format_size(costs[biggest] - roomiest)}"
        )
    free = ", ".join(f"{node.name} {format_size(max(0, r))}" for node, r in zip(nodes, room, strict=True))
    return (
        f"model fits in total but not as whole layers in node order: the {len(costs)} layers "
        f"({format_size(sum(costs))} at {at}) do not fit the room left on each node ({free})"
    )
