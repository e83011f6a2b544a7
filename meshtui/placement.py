"""Where llama.cpp is told to put the layers, and whether it did. Pure; one rule for `up`, `bench` and the tests.

The engine gets one `tensor_split` entry per RPC device, in device order: each remote stage's devices (a host
serving several GPUs shares its layers among them by free memory), then the head's local output stage. After
the load, llama.cpp's own layer -> device log, mapped back to node names, must equal the plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshtui.capacity import HEAD_NAME
from meshtui.errors import EngineError
from meshtui.planner import Plan, split_among_devices


@dataclass(frozen=True)
class EngineSplit:
    """The load parameters that place the layers."""

    tensor_split: tuple[float, ...]
    n_gpu_layers: int


def engine_split(plan: Plan, device_memory: Mapping[str, Sequence[int]] | None = None) -> EngineSplit:
    """`device_memory`: a remote node's devices' free memory, for a node serving more than one device."""
    split: list[float] = []
    for a in plan.remote:
        weights = (device_memory or {}).get(a.name, ())
        if len(weights) > 1:
            split.extend(float(x) for x in split_among_devices(a.n_layers, weights))
        else:
            split.append(float(a.n_layers))
    if plan.output_on_head:
        split.append(1.0)
    return EngineSplit(tuple(split), plan.n_gpu_layers)


def expected_placement(plan: Plan) -> dict[str, list[int]]:
    """Every node that holds layers -> its layers (the head's output layer included), as the plan says."""
    expected = {a.name: plan.layers_of(a.name) for a in plan.assignments}
    return {name: layers for name, layers in expected.items() if layers}


def placement_by_node(by_device: Mapping[str, Sequence[int]], device_endpoints: Mapping[str, str],
                      endpoint_to_node: Mapping[str, str]) -> dict[str, list[int]]:
    """llama.cpp's layer -> device log, as layer lists per node name (the head's CPU is "CPU")."""
    placement: dict[str, list[int]] = {}
    for device, layers in by_device.items():
        name = HEAD_NAME if device == "CPU" else endpoint_to_node.get(device_endpoints.get(device, ""), device)
        placement.setdefault(name, []).extend(layers)
    return {k: sorted(v) for k, v in placement.items()}


def check_placement(placement: Mapping[str, list[int]], plan: Plan) -> None:
    """llama.cpp must have put every layer exactly where the plan said (an empty log is not checked)."""
    expected = expected_placement(plan)
    if placement and dict(placement) != expected:
        raise EngineError(f"llama.cpp placed layers differently from the plan: {dict(placement)} != {expected}")
