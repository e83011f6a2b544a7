"""Decode-speed prediction: bytes read over bandwidth, plus one round trip per stage."""

from __future__ import annotations

import pytest
from test_planner import GiB, MiB, make_model

from meshtui.planner import NodeCapacity, plan_layer_split
from meshtui.predict import EFFICIENCY, predict_decode


def test_prediction_adds_compute_per_node_and_a_round_trip_per_stage() -> None:
    model = make_model([10 * MiB] * 4, output_bytes=20 * MiB)
    plan = plan_layer_split(model, [NodeCapacity("head", 8 * GiB, True), NodeCapacity("a", 8 * GiB)], 1024)
    bandwidth = {"head": 1e9, "a": 2e9}
    prediction = predict_decode(plan, model, bandwidth, {"a": 1.5})
    assert prediction is not None
    by_name = {n.name: n for n in prediction.nodes}
    for a in plan.assignments:
        read = sum(model.layer_weight_bytes[i] if i < model.n_layer else model.output_bytes
                   for i in range(a.start, a.end))
        assert by_name[a.name].bytes_per_token == read
        assert by_name[a.name].compute_ms == pytest.approx(read / (bandwidth[a.name] * EFFICIENCY) * 1000)
    assert by_name["head"].network_ms == 0.0 and by_name["a"].network_ms == 1.5
    total = sum(n.compute_ms + n.network_ms for n in prediction.nodes)
    assert prediction.tokens_per_second == pytest.approx(1000 / total)


def test_no_prediction_without_a_bandwidth_for_a_node_with_layers() -> None:
    model = make_model([10 * MiB] * 4, output_bytes=20 * MiB)
    plan = plan_layer_split(model, [NodeCapacity("head", 8 * GiB, True), NodeCapacity("a", 8 * GiB)], 1024)
    assert predict_decode(plan, model, {"head": 1e9, "a": None}, {}) is None
