"""The placement rule: one tensor_split and one expected placement for `up`, `plan` and `bench`."""

from __future__ import annotations

import pytest

from meshtui.capacity import HEAD_NAME
from meshtui.errors import EngineError
from meshtui.placement import EngineSplit, check_placement, engine_split, expected_placement, placement_by_node
from meshtui.planner import NodeAssignment, Plan


def plan(*, output_on_head: bool) -> Plan:
    """6 blocks + the output layer: the head 0-2, h1 2-4, h2 4-7 (or 4-6 with the output layer on the head)."""
    end = 6 if output_on_head else 7
    assignments = (
        NodeAssignment(HEAD_NAME, 0, 2, 0, 0, 0, is_head=True),
        NodeAssignment("h1", 2, 4, 0, 0, 0, is_head=False),
        NodeAssignment("idle", 4, 4, 0, 0, 0, is_head=False),
        NodeAssignment("h2", 4, end, 0, 0, 0, is_head=False),
    )
    return Plan(n_layer=6, context=64, assignments=assignments, reasons=(), output_on_head=output_on_head)


def test_one_device_per_stage_then_the_heads_output_stage() -> None:
    assert engine_split(plan(output_on_head=False)) == EngineSplit((2.0, 3.0), 5)
    assert engine_split(plan(output_on_head=True)) == EngineSplit((2.0, 2.0, 1.0), 5)


def test_a_stage_with_several_gpus_shares_its_layers_by_their_free_memory() -> None:
    split = engine_split(plan(output_on_head=True), {"h1": [3, 1], "h2": [5]})
    assert split == EngineSplit((2.0, 0.0, 2.0, 1.0), 5)
    assert engine_split(plan(output_on_head=True), {"h2": [1, 1]}).tensor_split == (2.0, 1.0, 1.0, 1.0)


def test_expected_placement_leaves_out_nodes_without_layers_and_gives_the_head_its_output_layer() -> None:
    assert expected_placement(plan(output_on_head=True)) == {HEAD_NAME: [0, 1, 6], "h1": [2, 3], "h2": [4, 5]}
    assert expected_placement(plan(output_on_head=False)) == {HEAD_NAME: [0, 1], "h1": [2, 3], "h2": [4, 5, 6]}


def test_llama_cpps_log_maps_back_to_node_names_and_must_match_the_plan() -> None:
    by_device = {"CPU": [1, 0], "RPC0": [2, 3], "RPC1": [4], "RPC2": [5], "RPC3": [6]}
    endpoints = {"RPC0": "127.0.0.1:1", "RPC1": "127.0.0.1:2", "RPC2": "127.0.0.1:2", "RPC3": "127.0.0.1:3"}
    names = {"127.0.0.1:1": "h1", "127.0.0.1:2": "h2", "127.0.0.1:3": HEAD_NAME}
    placement = placement_by_node(by_device, endpoints, names)
    assert placement == {HEAD_NAME: [0, 1, 6], "h1": [2, 3], "h2": [4, 5]}
    check_placement(placement, plan(output_on_head=True))
    check_placement({}, plan(output_on_head=True))  # no log: nothing to check
    with pytest.raises(EngineError, match=r"^llama.cpp placed layers differently from the plan: "):
        check_placement(placement, plan(output_on_head=False))
