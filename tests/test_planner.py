from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtui.errors import PlanError
from meshtui.gguf_facts import ModelFacts
from meshtui.placement import engine_split
from meshtui.planner import (
    NODE_OVERHEAD_BYTES,
    NodeAssignment,
    NodeCapacity,
    Plan,
    plan_layer_split,
    split_among_devices,
)

MiB, GiB = 1024**2, 1024**3
OVERHEAD = NODE_OVERHEAD_BYTES
CONTEXT = 1024
KV_PER_LAYER = CONTEXT * (1 * 64 + 1 * 64) * 2  # one KV head of 64 dims, f16 K and V: 256 KiB


def make_model(block_costs: Sequence[int], output_bytes: int, input_bytes: int = 100 * MiB) -> ModelFacts:
    """A model whose layer costs at CONTEXT are exactly `block_costs` (each at least KV_PER_LAYER)."""
    return ModelFacts(
        path=Path("x.gguf"),
        architecture="llama",
        name="x",
        file_size=0,
        n_layer=len(block_costs),
        n_embd=128,
        n_head=2,
        n_head_kv=1,
        head_dim_k=64,
        head_dim_v=64,
        n_ctx_train=4096,
        layer_weight_bytes=tuple(cost - KV_PER_LAYER for cost in block_costs),
        output_bytes=output_bytes,
        input_bytes=input_bytes,
    )


def uniform_model(n_layer: int, cost: int = 100 * MiB) -> ModelFacts:
    """Every layer, the output layer included, costs `cost` at CONTEXT."""
    return make_model([cost] * n_layer, output_bytes=cost)


def head(usable: int, model: ModelFacts) -> NodeCapacity:
    """A head whose room for layers is `usable` once the embeddings and its buffers are paid."""
    return NodeCapacity("head", usable + model.input_bytes + OVERHEAD, is_head=True)


def node(name: str, room: int) -> NodeCapacity:
    return NodeCapacity(name, room + OVERHEAD)


def ranges(plan: Plan) -> list[tuple[str, int, int]]:
    return [(a.name, a.start, a.end) for a in plan.assignments]


# --- the split
def test_equal_nodes_get_equal_layers() -> None:
    model = uniform_model(29)  # 30 layers with the output layer
    plan = plan_layer_split(model, [head(10 * GiB, model), node("a", 10 * GiB), node("b", 10 * GiB)], CONTEXT)
    assert ranges(plan) == [("head", 0, 10), ("a", 10, 20), ("b", 20, 30)]
    assert plan.n_gpu_layers == 20
    assert engine_split(plan).tensor_split == (10.0, 10.0)
    assert [a.name for a in plan.remote] == ["a", "b"]


def test_memory_one_to_two_gives_layers_one_to_two() -> None:
    model = uniform_model(29)
    plan = plan_layer_split(model, [head(4 * GiB, model), node("big", 8 * GiB)], CONTEXT)
    assert ranges(plan) == [("head", 0, 10), ("big", 10, 30)]
    plan = plan_layer_split(model, [head(3 * GiB, model), node("a", 6 * GiB), node("b", 6 * GiB)], CONTEXT)
    assert [a.n_layers for a in plan.assignments] == [6, 12, 12]


def test_weighting_is_by_cost_not_by_layer_count() -> None:
    # The output layer weighs as much as ten blocks: the last node gets fewer blocks besides it.
    model = make_model([10 * MiB] * 20, output_bytes=100 * MiB)
    plan = plan_layer_split(model, [head(GiB, model), node("a", GiB), node("b", GiB)], CONTEXT)
    assert ranges(plan) == [("head", 0, 10), ("a", 10, 20), ("b", 20, 21)]


def test_head_without_room_for_layers_sends_everything_remote() -> None:
    # compute = false on the head: the caller passes just enough for the embeddings and buffers.
    model = uniform_model(9)
    head_node = NodeCapacity("head", model.input_bytes + OVERHEAD, is_head=True)
    plan = plan_layer_split(model, [head_node, node("a", 4 * GiB), node("b", 4 * GiB)], CONTEXT)
    assert ranges(plan) == [("head", 0, 0), ("a", 0, 5), ("b", 5, 10)]
    assert plan.n_gpu_layers == 10 == model.n_layer + 1
    assert engine_split(plan).tensor_split == (5.0, 5.0)
    head_assignment = plan.assignments[0]
    assert head_assignment.weight_bytes == model.input_bytes
    assert head_assignment.used_bytes == head_assignment.usable_bytes  # exactly full, not over
    assert any("head has 0 B left" in reason for reason in plan.reasons)


def test_output_layer_lands_on_the_last_node_with_layers() -> None:
    model = uniform_model(9)
    nodes = [head(4 * GiB, model), node("a", 4 * GiB), NodeCapacity("empty", 0), NodeCapacity("tiny", MiB)]
    plan = plan_layer_split(model, nodes, CONTEXT)
    assert ranges(plan) == [("head", 0, 5), ("a", 5, 10), ("empty", 10, 10), ("tiny", 10, 10)]
    a = plan.assignments[1]
    assert a.weight_bytes == 4 * (100 * MiB - KV_PER_LAYER) + model.output_bytes
    assert a.kv_bytes == 4 * KV_PER_LAYER  # the output layer has no KV cache
    assert [r.name for r in plan.remote] == ["a"]
    assert engine_split(plan).tensor_split == (5.0,)
    assert plan.assignments[2].used_bytes == 0  # nodes without layers pay no compute buffers
    assert plan.reasons[-1] == "the output layer goes to a, the last node with layers"


def test_zero_layer_nodes_are_kept_in_order() -> None:
    model = uniform_model(3)
    nodes = [head(GiB, model), NodeCapacity("gone", -5), node("a", GiB)]
    plan = plan_layer_split(model, nodes, CONTEXT)
    assert [a.name for a in plan.assignments] == ["head", "gone", "a"]
    assert plan.assignments[1].start == plan.assignments[1].end == 2


def test_rounding_that_overfills_a_node_is_repaired() -> None:
    unit = 100 * MiB
    model = uniform_model(3, cost=unit)  # 4 layers of 100 MiB
    # Proportional: the head's ideal is 1.55 layers, which rounds to 2 (200 MiB > 190 MiB): over capacity.
    nodes = [head(190 * MiB, model), node("a", unit), node("b", unit), node("c", unit)]
    plan = plan_layer_split(model, nodes, CONTEXT)
    assert [a.n_layers for a in plan.assignments] == [1, 1, 1, 1]
    assert all(a.used_bytes <= a.usable_bytes for a in plan.assignments)
    assert any("rebalanced" in reason for reason in plan.reasons)


def test_plan_is_deterministic_and_serialisable() -> None:
    model = make_model([7 * MiB, 9 * MiB, 11 * MiB, 5 * MiB], output_bytes=20 * MiB)
    nodes = [head(30 * MiB, model), node("a", 17 * MiB), node("b", 40 * MiB)]
    first = plan_layer_split(model, nodes, CONTEXT)
    assert plan_layer_split(model, list(nodes), CONTEXT) == first
    json_rows = first.to_json()
    assert [row["name"] for row in json_rows] == ["head", "a", "b"]
    assert set(json_rows[0]) == {"name", "layers", "output_layer", "weight_bytes", "kv_bytes", "usable_bytes",
                                 "device"}
    assert [row["layers"] for row in json_rows] == [[a.start, a.end] for a in first.assignments]


def test_reasons_explain_the_split() -> None:
    model = uniform_model(29)
    plan = plan_layer_split(model, [head(6 * GiB, model), node("h1", 6 * GiB), node("h2", 6 * GiB)], CONTEXT)
    assert "h1 offers 6.00 GiB of 18.0 GiB usable (33%) -> 10 of 30 layers" in plan.reasons


# --- refusals
def test_refusal_names_the_shortfall_exactly() -> None:
    # 10 blocks of 300 MiB (KV 256 KiB each) + a 300 MiB output layer + 100 MiB embeddings = 3.32 GiB;
    # with 3 x 128 MiB compute buffers the model needs 3.69 GiB; the nodes offer 1 + 1 + 0.5 GiB.
    model = uniform_model(10, cost=300 * MiB)
    nodes = [NodeCapacity("head", GiB, is_head=True), NodeCapacity("a", GiB), NodeCapacity("b", GiB // 2)]
    with pytest.raises(PlanError) as info:
        plan_layer_split(model, nodes, CONTEXT)
    assert str(info.value) == (
        "model needs 3.70 GiB (weights 3.32 GiB + KV cache 2.50 MiB at context 1024 + compute buffers "
        "384 MiB) but the 3 nodes offer 2.50 GiB usable: short by 1.20 GiB"
    )


def test_refusal_when_a_single_layer_fits_nowhere() -> None:
    model = make_model([100 * MiB, 900 * MiB, 100 * MiB], output_bytes=100 * MiB)
    nodes = [head(500 * MiB, model), node("a", 500 * MiB), node("b", 500 * MiB)]
    with pytest.raises(PlanError, match=r"^layer 1 alone needs 900 MiB at context 1024 .* short by 400 MiB$"):
        plan_layer_split(model, nodes, CONTEXT)


def test_refusal_when_whole_layers_do_not_pack() -> None:
    model = uniform_model(3, cost=100 * MiB)  # 4 layers of 100 MiB, 400 MiB; the nodes have 450 MiB of room
    nodes = [head(150 * MiB, model), node("a", 150 * MiB), node("b", 150 * MiB)]
    with pytest.raises(PlanError, match=r"^model fits in total but not as whole layers in node order"):
        plan_layer_split(model, nodes, CONTEXT)


def test_refusal_when_the_head_cannot_hold_the_embeddings() -> None:
    model = uniform_model(3, cost=10 * MiB)
    nodes = [NodeCapacity("head", 150 * MiB, is_head=True), node("a", 4 * GiB)]
    with pytest.raises(PlanError, match=r"^the head head must hold the token embeddings .* by 78.0 MiB$"):
        plan_layer_split(model, nodes, CONTEXT)


@pytest.mark.parametrize(
    "nodes",
    [
        [],
        [NodeCapacity("a", GiB)],
        [NodeCapacity("a", GiB), NodeCapacity("head", GiB, is_head=True)],
        [NodeCapacity("h", GiB, is_head=True), NodeCapacity("h2", GiB, is_head=True)],
        [NodeCapacity("h", GiB, is_head=True), NodeCapacity("h", GiB)],
    ],
)
def test_programming_errors_are_value_errors(nodes: list[NodeCapacity]) -> None:
    with pytest.raises(ValueError):
        plan_layer_split(uniform_model(3), nodes, CONTEXT)


def test_context_must_be_positive() -> None:
    model = uniform_model(3)
    with pytest.raises(ValueError):
        plan_layer_split(model, [head(GiB, model)], 0)


# --- properties
def contiguous_split_exists(model: ModelFacts, nodes: Sequence[NodeCapacity], context: int) -> bool:
    """Independent check by dynamic programming over (node, layers covered so far)."""
    costs = model.node_layer_costs(context)
    covered = {0} if nodes[0].usable_bytes >= model.input_bytes + OVERHEAD else set()
    for j, capacity in enumerate(nodes):
        room = capacity.usable_bytes - OVERHEAD - (model.input_bytes if j == 0 else 0)
        reachable = set(covered)
        for start in covered:
            total = 0
            for end in range(start + 1, len(costs) + 1):
                total += costs[end - 1]
                if total > room:
                    break
                reachable.add(end)
        covered = reachable
    return len(costs) in covered


@st.composite
def planning_problems(draw: st.DrawFn) -> tuple[ModelFacts, list[NodeCapacity], int]:
    n_layer = draw(st.integers(1, 40))
    context = draw(st.sampled_from([1, 256, 2048, 32768]))
    kv = context * 256
    weights = draw(st.lists(st.integers(0, 200 * MiB), min_size=n_layer, max_size=n_layer))
    model = make_model([w + KV_PER_LAYER for w in weights], output_bytes=draw(st.integers(0, 300 * MiB)))
    model = ModelFacts(**{**model.__dict__, "input_bytes": draw(st.integers(0, 300 * MiB))})
    total = model.weight_bytes + n_layer * kv
    n_nodes = draw(st.integers(1, 6))
    # Capacities around what the model needs, so both plans and refusals come up.
    fractions = draw(st.lists(st.floats(-0.05, 1.2), min_size=n_nodes, max_size=n_nodes))
    nodes = [
        NodeCapacity(f"n{j}", int(f * total) + (OVERHEAD if f > 0 else 0), is_head=(j == 0))
        for j, f in enumerate(fractions)
    ]
    return model, nodes, context


@settings(max_examples=300, deadline=None)
@given(planning_problems())
def test_any_plan_is_contiguous_complete_and_within_capacity(
    problem: tuple[ModelFacts, list[NodeCapacity], int],
) -> None:
    model, nodes, context = problem
    try:
        plan = plan_layer_split(model, nodes, context)
    except PlanError as err:
        assert "\n" not in str(err)
        assert not contiguous_split_exists(model, nodes, context)
        return
    assert contiguous_split_exists(model, nodes, context)
    assert [a.name for a in plan.assignments] == [n.name for n in nodes]
    assert plan.assignments[0].is_head and plan.assignments[0].start == 0
    assert plan.assignments[-1].end == model.n_layer + 1
    for before, after in zip(plan.assignments, plan.assignments[1:], strict=False):
        assert before.end == after.start
    for assignment in plan.assignments:
        assert assignment.start <= assignment.end
        if assignment.is_head or assignment.n_layers > 0:
            assert assignment.used_bytes <= assignment.usable_bytes
        else:
            assert assignment.used_bytes == 0
    assert sum(a.weight_bytes for a in plan.assignments) == model.weight_bytes
    assert sum(a.kv_bytes for a in plan.assignments) == model.n_layer * model.kv_bytes_per_layer(context)
    # What llama.cpp is told matches the ranges.
    assert plan.n_gpu_layers == sum(a.n_layers for a in plan.remote)
    assert plan.n_gpu_layers == model.n_layer + 1 - plan.assignments[0].n_layers
    assert engine_split(plan).tensor_split == tuple(float(a.n_layers) for a in plan.remote)
    assert all(a.n_layers > 0 for a in plan.remote)
    assert len(plan.reasons) >= 3


# --- llama.cpp's own assignment rule
def llama_cpp_layer_devices(n_layer: int, n_gpu_layers: int, tensor_split: Sequence[float]) -> list[int]:
    """A copy of load_tensors' rule in src/llama-model.cpp (float32 like the C++); -1 is the head's CPU."""
    n_devices = len(tensor_split)
    splits = np.array(tensor_split, dtype=np.float32)
    split_sum = np.float32(0.0)
    for i in range(n_devices):
        split_sum = np.float32(split_sum + splits[i])
        splits[i] = split_sum
    for i in range(n_devices):
        splits[i] = np.float32(splits[i] / split_sum)
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act_gpu_layers = 0 if n_devices == 0 else min(n_gpu_layers, n_layer + 1)
    devices = []
    for il in range(n_layer + 1):  # the blocks, then the output layer (il == n_layer)
        if il < i_gpu_start or (il - i_gpu_start) >= act_gpu_layers:
            devices.append(-1)
            continue
        position = np.float32(np.float32(il - i_gpu_start) / np.float32(act_gpu_layers))
        devices.append(int(np.searchsorted(splits, position, side="right")))  # std::upper_bound
    return devices


def plan_devices(plan: Plan) -> list[int]:
    remote_names = [a.name for a in plan.remote]
    devices = []
    for assignment in plan.assignments:
        on_cpu = assignment.is_head or assignment.n_layers == 0
        device = -1 if on_cpu else remote_names.index(assignment.name)
        devices += [device] * assignment.n_layers
    return devices


@settings(max_examples=300, deadline=None)
@given(planning_problems())
def test_llama_cpp_reproduces_planned_ranges(problem: tuple[ModelFacts, list[NodeCapacity], int]) -> None:
    model, nodes, context = problem
    try:
        plan = plan_layer_split(model, nodes, context)
    except PlanError:
        return
    split = engine_split(plan)
    assert llama_cpp_layer_devices(plan.n_layer, split.n_gpu_layers, split.tensor_split) == plan_devices(plan)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=12))
def test_llama_cpp_reproduces_any_layer_counts(counts: list[int]) -> None:
    # Plans with many layers and many nodes stress the float32 split points harder than real models do.
    total = sum(counts)
    if total == 0:
        counts = [*counts[:-1], 1]
        total = 1
    boundary = 0
    assignments = []
    for j, count in enumerate(counts):
        assignments.append(NodeAssignment(f"n{j}", boundary, boundary + count, 0, 0, 1, is_head=(j == 0)))
        boundary += count
    plan = Plan(n_layer=total - 1, context=1, assignments=tuple(assignments), reasons=())
    split = engine_split(plan)
    assert llama_cpp_layer_devices(plan.n_layer, split.n_gpu_layers, split.tensor_split) == plan_devices(plan)


def test_output_on_head_keeps_the_output_layer_home_and_splits_only_blocks() -> None:
    model = make_model([100 * MiB] * 9, output_bytes=300 * MiB)
    nodes = [NodeCapacity("head", 8 * GiB, is_head=True), NodeCapacity("a", 8 * GiB), NodeCapacity("b", 8 * GiB)]
    plan = plan_layer_split(model, nodes, CONTEXT, output_on_head=True)
    assert plan.output_on_head
    assert [(a.start, a.end) for a in plan.assignments] == [(0, 3), (3, 6), (6, 9)]  # blocks only
    assert engine_split(plan).tensor_split == (3.0, 3.0, 1.0)  # the head's local output stage is the last device
    assert plan.n_gpu_layers == 7  # 6 remote blocks + the output layer, on devices
    assert plan.layers_of("head") == [0, 1, 2, 9]
    head = plan.assignments[0]
    assert head.weight_bytes == model.input_bytes + model.output_bytes + 3 * (100 * MiB - KV_PER_LAYER)
    assert plan.reasons[-1].startswith("the output layer stays on the head")
    # llama.cpp's own rule puts layer 9 on the third device (the head's local stage).
    splits = np.cumsum(np.array(engine_split(plan).tensor_split, dtype=np.float32))
    splits = splits / splits[-1]
    start = model.n_layer + 1 - plan.n_gpu_layers
    device = int(np.searchsorted(splits, np.float32(9 - start) / np.float32(plan.n_gpu_layers), side="right"))
    assert device == 2


def test_output_on_head_falls_back_when_the_head_cannot_hold_it_or_holds_everything() -> None:
    model = make_model([100 * MiB] * 9, output_bytes=300 * MiB)
    small_head = [NodeCapacity("head", 300 * MiB, is_head=True), NodeCapacity("a", 8 * GiB)]
    plan = plan_layer_split(model, small_head, CONTEXT, output_on_head=True)
    assert not plan.output_on_head and plan.assignments[-1].end == model.n_layer + 1
    alone = [NodeCapacity("head", 8 * GiB, is_head=True), NodeCapacity("a", 0)]
    plan = plan_layer_split(model, alone, CONTEXT, output_on_head=True)
    assert not plan.output_on_head and plan.assignments[0].end == model.n_layer + 1


def test_speed_weighting_gives_faster_nodes_more_layers_within_memory() -> None:
    model = uniform_model(12, cost=100 * MiB)
    nodes = [NodeCapacity("head", 8 * GiB, is_head=True), NodeCapacity("a", 8 * GiB), NodeCapacity("b", 8 * GiB)]
    by_memory = plan_layer_split(model, nodes, CONTEXT)
    by_speed = plan_layer_split(model, nodes, CONTEXT, speeds=[1.0, 1.0, 2.0])
    assert [a.n_layers for a in by_memory.assignments] == [4, 5, 4]  # the head also pays for the embeddings
    assert [a.n_layers for a in by_speed.assignments] == [3, 3, 7]
    assert "b has 50% of the speed -> 7 of 13 layers" in by_speed.reasons
    # Memory still bounds a fast node: b can hold only 3 layers, so the split is rebalanced.
    tight = [*nodes[:2], NodeCapacity("b", OVERHEAD + 3 * 100 * MiB)]
    plan = plan_layer_split(model, tight, CONTEXT, speeds=[1.0, 1.0, 10.0])
    assert all(a.used_bytes <= a.usable_bytes for a in plan.assignments)
    assert sum(a.n_layers for a in plan.assignments) == 13
    with pytest.raises(ValueError):
        plan_layer_split(model, nodes, CONTEXT, speeds=[1.0, 0.0, 1.0])


def test_a_gpu_node_is_planned_by_its_device_memory() -> None:
    model = uniform_model(10, cost=100 * MiB)
    nodes = [head(0, model), NodeCapacity("gpu", 6 * 100 * MiB + OVERHEAD, device="NVIDIA H200"),
             node("cpu", 5 * 100 * MiB)]
    plan = plan_layer_split(model, nodes, CONTEXT)
    by_name = {a.name: a for a in plan.assignments}
    assert by_name["gpu"].device == "NVIDIA H200" and by_name["cpu"].device == "cpu"
    assert (by_name["gpu"].n_layers, by_name["cpu"].n_layers) == (6, 5)
    assert plan.to_json()[1]["device"] == "NVIDIA H200"


@pytest.mark.parametrize(
    ("n_layers", "weights", "expected"),
    [
        (10, [1], [10]),
        (10, [80, 80], [5, 5]),
        (7, [80, 80], [4, 3]),  # ties go to the earlier device
        (7, [3, 1], [5, 2]),
        (3, [80, 80, 40], [1, 1, 1]),
        (0, [5, 5], [0, 0]),
        (5, [0, 0], [3, 2]),  # no memory figures: even shares
    ],
)
def test_a_nodes_layers_are_shared_among_its_devices(n_layers: int, weights: list[int], expected: list[int]) -> None:
    assert split_among_devices(n_layers, weights) == expected
    assert sum(split_among_devices(n_layers, weights)) == n_layers


def test_sharing_among_devices_rejects_nonsense() -> None:
    for n_layers, weights in ((3, []), (-1, [1]), (3, [1, -1])):
        with pytest.raises(ValueError):
            split_among_devices(n_layers, weights)


# --- several sequences decoded together (--parallel)
def test_parallel_reserves_kv_for_every_sequence_and_says_so() -> None:
    model = uniform_model(29)  # each block: 100 MiB at CONTEXT, of which KV_PER_LAYER is its KV cache
    nodes = [head(10 * GiB, model), node("a", 10 * GiB), node("b", 10 * GiB)]
    one = plan_layer_split(model, nodes, CONTEXT)
    four = plan_layer_split(model, nodes, CONTEXT, parallel=4)
    assert ranges(four) == ranges(one) and (four.parallel, four.context) == (4, CONTEXT)
    for a1, a4 in zip(one.assignments, four.assignments, strict=True):
        blocks = min(a1.end, model.n_layer) - a1.start
        assert a4.kv_bytes == 4 * a1.kv_bytes == blocks * 4 * KV_PER_LAYER
        assert a4.used_bytes - a1.used_bytes == 3 * a1.kv_bytes
    assert four.reasons[0].startswith(f"at context {CONTEXT} x 4 sequences each block needs 101 MiB "
                                      "(99.8 MiB weights + 1.00 MiB KV cache)")
    assert four.reasons[-1] == (f"the KV cache holds 4 sequences of {CONTEXT} tokens (replies decoded together, "
                                f"--parallel 4): 29.0 MiB in all, 7.25 MiB each")
    assert not any("sequences" in reason for reason in one.reasons)


def test_parallel_sequences_that_do_not_fit_are_refused_by_name() -> None:
    # Room for every layer with one sequence; with 64, the KV cache (16 MiB a layer) overfills the nodes.
    model = make_model([KV_PER_LAYER + MiB] * 10, output_bytes=MiB)
    nodes = [head(20 * MiB, model), node("a", 20 * MiB)]
    assert plan_layer_split(model, nodes, CONTEXT).parallel == 1
    with pytest.raises(PlanError, match=rf"at context {CONTEXT} x 64 sequences"):
        plan_layer_split(model, nodes, CONTEXT, parallel=64)
    with pytest.raises(ValueError, match="parallel must be at least 1"):
        plan_layer_split(model, nodes, CONTEXT, parallel=0)
