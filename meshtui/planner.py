"""Decide which contiguous layer range each node holds: a pure function of model facts and node memory.

llama.cpp's own rule (src/llama-model.cpp, load_tensors) fixes the shape of every plan: the head's CPU keeps
the first `n_layer + 1 - n_gpu_layers` layers, the RPC devices take the rest in device order by cumulative
`tensor_split`, and the output head counts as layer `n_layer`. So a plan is a list of boundaries in node
order, head first; the engine turns it into `n_gpu_layers` and `tensor_split`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshtui.errors import PlanError
from meshtui.plan import NODE_OVERHEAD_BYTES, KvReserve, NodeAssignment, NodeCapacity, Plan, assign_layers, refusal
from meshtui.units import format_size

if TYPE_CHECKING:
    from meshtui.gguf_facts import ModelFacts

# The plan's types live with their sizing in meshtui/plan.py; importers of the planner find them here too.
__all__ = ["NODE_OVERHEAD_BYTES", "KvReserve", "NodeAssignment", "NodeCapacity", "Plan", "plan_layer_split",
           "split_among_devices"]

# Utilisation is searched in steps of 1/2**32 of each node's usable memory: integer arithmetic, so the same
# input gives the same plan on every machine.
_UTILISATION_STEPS = 2**32


def plan_layer_split(model: ModelFacts, nodes: Sequence[NodeCapacity], context: int, *,
                     output_on_head: bool = False, speeds: Sequence[float] | None = None,
                     parallel: int = 1) -> Plan:
    """Split layers in proportion to each node's free memory, then make sure every node fits.

    With `speeds` (one positive number per node, e.g. its memory bandwidth), shares follow speed instead of
    memory among the nodes that have room for a layer, so faster nodes get more layers; memory still bounds
    every node (a split that overfills one is rebalanced to the lowest peak use).

    With `output_on_head`, the output layer is a fixed cost of the head (like the embeddings) and the
    blocks are split as usual; if the head cannot hold it, or the head ends up holding every block, the
    plain plan (output on the last node with layers) is returned instead.

    With `parallel` N, the KV cache is reserved for N sequences (replies decoded together) of `context` tokens
    each: N times one reply's, on every node in proportion to its layers.

    Raises PlanError (one line, naming the shortfall) when no contiguous whole-layer split fits, and
    ValueError for programming errors (no nodes, the head not first, duplicate names, context < 1).
    """
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, not {parallel}")
    at = KvReserve(context, parallel)
    if output_on_head and len(nodes) > 1:
        # Plan a model whose output layer costs nothing and whose embeddings weigh what both weigh.
        moved = dataclasses.replace(model, output_bytes=0, input_bytes=model.input_bytes + model.output_bytes)
        try:
            plan, why = _plan_explained(moved, nodes, at, speeds)
        except PlanError:
            plan = None
        if plan is not None and any(a.n_layers and a.start < model.n_layer for a in plan.assignments[1:]):
            return _say_sequences(_output_to_head(plan, why, model, at), model, at)
    return _say_sequences(_plan_explained(model, nodes, at, speeds)[0], model, at)


def _say_sequences(plan: Plan, model: ModelFacts, at: KvReserve) -> Plan:
    """With several sequences, a reason says what their KV cache costs: the plan's memory is sized for them."""
    if at.sequences == 1:
        return plan
    total = sum(a.kv_bytes for a in plan.assignments)
    one = model.n_layer * model.kv_bytes_per_layer(at.context)
    reason = (f"the KV cache holds {at.sequences} sequences of {at.context} tokens (replies decoded together, "
              f"--parallel {at.sequences}): {format_size(total)} in all, {format_size(one)} each")
    return dataclasses.replace(plan, reasons=(*plan.reasons, reason))


@dataclass(frozen=True)
class _Why:
    """A plan's reasons as parts, so a plan derived from another re-words them without parsing its text."""

    header: str
    offers: tuple[tuple[str, str], ...]  # (node name, what it offers), in node order
    rebalanced: str | None  # set when rounding overfilled a node and the split was rebalanced
    output_holder: str

    def lines(self, counts: dict[str, int], n_total: int, unit: str) -> tuple[str, ...]:
        offers = [f"{name} {offer} -> {counts[name]} of {n_total} {unit}" for name, offer in self.offers]
        return (self.header, *offers, *([self.rebalanced] if self.rebalanced else []))


def _output_to_head(plan: Plan, why: _Why, model: ModelFacts, at: KvReserve) -> Plan:
    """The zero-cost output layer ended on the last stage: take it off, and account its bytes on the head."""
    assignments = []
    for a in plan.assignments:
        end = min(a.end, model.n_layer)
        start = min(a.start, end)
        node = NodeCapacity(a.name, a.usable_bytes, a.is_head, a.device)
        fixed = assign_layers(model, node, start, end, at)
        if a.is_head:
            fixed = dataclasses.replace(fixed, weight_bytes=fixed.weight_bytes + model.output_bytes)
        assignments.append(fixed)
    kv = model.kv_bytes_per_layer(at.tokens)
    blocks = [w + kv for w in model.layer_weight_bytes]
    reasons = [
        f"at {at} blocks need {format_size(min(blocks))} to {format_size(max(blocks))} each "
        f"(weights + {format_size(kv)} KV cache); the head keeps the token embeddings "
        f"({format_size(model.input_bytes)}) and the output layer ({format_size(model.output_bytes)})"
    ]
    counts = {a.name: a.n_layers for a in assignments}
    reasons.extend(why.lines(counts, model.n_layer, "blocks")[1:])
    reasons.append("the output layer stays on the head (a local stage), so logits never cross the network")
    return Plan(n_layer=plan.n_layer, context=plan.context, assignments=tuple(assignments),
                reasons=tuple(reasons), output_on_head=True, parallel=at.sequences)


def _plan_explained(model: ModelFacts, nodes: Sequence[NodeCapacity], at: KvReserve,
                    speeds: Sequence[float] | None = None) -> tuple[Plan, _Why]:
    """The memory-proportional contiguous split, repaired to fit.

    Raises PlanError (one line, naming the shortfall) when no contiguous whole-layer split fits, and
    ValueError for programming errors (no nodes, the head not first, duplicate names, context < 1).
    """
    _check_arguments(nodes, at)
    costs = model.node_layer_costs(at.tokens)
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    head_fixed = model.input_bytes + NODE_OVERHEAD_BYTES
    # Bytes each node can give to layers once its fixed share is paid; negative when it cannot even pay that.
    room = [node.usable_bytes - NODE_OVERHEAD_BYTES for node in nodes]
    room[0] = nodes[0].usable_bytes - head_fixed

    if nodes[0].usable_bytes < head_fixed or _greedy_fill(costs, room) is None:
        raise PlanError(refusal(model, nodes, at, costs, room))

    smallest = min(costs)
    shares = [r if r >= max(smallest, 0) else 0 for r in room]
    if speeds is not None:
        if len(speeds) != len(nodes) or any(not speed > 0 for speed in speeds):
            raise ValueError("speeds needs one positive number per node")
        # Integer shares keep the arithmetic exact; scale so the slowest node still gets a fine grain.
        scale = 1_000_000 / min(speeds)
        shares = [round(speed * scale) if share else 0 for speed, share in zip(speeds, shares, strict=True)]
    boundaries = _proportional_boundaries(prefix, shares)
    repaired = not all(
        (start == end and j > 0) or prefix[end] - prefix[start] <= room[j]
        for j, (start, end) in enumerate(_ranges(boundaries))
    )
    if repaired:
        boundaries = _min_peak_boundaries(costs, nodes, head_fixed)

    assignments = tuple(
        assign_layers(model, node, start, end, at)
        for node, (start, end) in zip(nodes, _ranges(boundaries), strict=True)
    )
    why = _reasons(model, at, costs, room, shares, assignments, repaired, by_speed=speeds is not None)
    reasons = (*why.lines({a.name: a.n_layers for a in assignments}, len(costs), "layers"),
               f"the output layer goes to {why.output_holder}, the last node with layers")
    return Plan(n_layer=model.n_layer, context=at.context, assignments=assignments, reasons=reasons,
                parallel=at.sequences), why


def _check_arguments(nodes: Sequence[NodeCapacity], at: KvReserve) -> None:
    if not nodes:
        raise ValueError("plan_layer_split needs at least the head node")
    if not nodes[0].is_head or any(node.is_head for node in nodes[1:]):
        raise ValueError("plan_layer_split needs exactly one head node, first in the list")
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"plan_layer_split got duplicate node names: {names}")
    if at.context < 1:
        raise ValueError(f"context must be at least 1, not {at.context}")


def _ranges(boundaries: Sequence[int]) -> list[tuple[int, int]]:
    """Node j holds layers [boundaries[j-1], boundaries[j]) with boundaries[-1] taken as 0."""
    starts = [0, *boundaries[:-1]]
    return list(zip(starts, boundaries, strict=True))


def _greedy_fill(costs: Sequence[int], capacity: Sequence[int]) -> list[int] | None:
    """Give each node, in order, as many of the next layers as fit; None if layers are left over.

    Filling each node to the brim is the best any contiguous split can do for the nodes after it, so this
    succeeds exactly when some contiguous split fits.
    """
    boundaries = []
    index = 0
    for cap in capacity:
        used = 0
        while index < len(costs) and used + costs[index] <= cap:
            used += costs[index]
            index += 1
        boundaries.append(index)
    return boundaries if index == len(costs) else None


def _proportional_boundaries(prefix: Sequence[int], shares: Sequence[int]) -> list[int]:
    """Cumulative boundaries nearest the memory-proportional ideal (ties go to the earlier boundary)."""
    total_cost = prefix[-1]
    total_share = sum(shares)
    boundaries = []
    low = 0
    cumulative_share = 0
    for share in shares:
        cumulative_share += share
        # Compare prefix[k] / total_cost with cumulative_share / total_share without dividing.
        target = total_cost * cumulative_share
        best = min(range(low, len(prefix)), key=lambda k: (abs(prefix[k] * total_share - target), k))
        boundaries.append(best)
        low = best
    boundaries[-1] = len(prefix) - 1
    return boundaries


def _min_peak_boundaries(costs: Sequence[int], nodes: Sequence[NodeCapacity], head_fixed: int) -> list[int]:
    """The greedy split under the lowest utilisation ceiling that still fits (binary search)."""

    def capacities(step: int) -> list[int]:
        caps = []
        for j, node in enumerate(nodes):
            fixed = head_fixed if j == 0 else NODE_OVERHEAD_BYTES
            caps.append(node.usable_bytes * step // _UTILISATION_STEPS - fixed)
        return caps

    low, high = 0, _UTILISATION_STEPS  # fill(high) succeeds: the caller checked it at full capacity
    while high - low > 1:
        middle = (low + high) // 2
        if _greedy_fill(costs, capacities(middle)) is None:
            low = middle
        else:
            high = middle
    boundaries = _greedy_fill(costs, capacities(high))
    assert boundaries is not None  # high is always a feasible ceiling
    return boundaries


def _reasons(
    model: ModelFacts,
    at: KvReserve,
    costs: Sequence[int],
    room: Sequence[int],
    shares: Sequence[int],
    assignments: Sequence[NodeAssignment],
    repaired: bool,
    by_speed: bool = False,
) -> _Why:
    kv = model.kv_bytes_per_layer(at.tokens)
    blocks = costs[:-1]
    if min(blocks) == max(blocks):
        block_text = f"each block needs {format_size(blocks[0])} ({format_size(blocks[0] - kv)} weights + "
    else:
        block_text = f"blocks need {format_size(min(blocks))} to {format_size(max(blocks))} each (with "
    header = (f"at {at} {block_text}{format_size(kv)} KV cache), the output layer "
              f"{format_size(costs[-1])}; the head also keeps the token embeddings "
              f"({format_size(model.input_bytes)})")
    total_share = sum(shares)
    offers = []
    for node_room, share, assignment in zip(room, shares, assignments, strict=True):
        if share == 0:
            offers.append((assignment.name, f"has {format_size(max(0, node_room))} left after its fixed needs, "
                                            f"less than one layer ({format_size(min(costs))})"))
            continue
        percent = round(100 * share / total_share)
        offer = (f"has {percent}% of the speed" if by_speed
                 else f"offers {format_size(share)} of {format_size(total_share)} usable ({percent}%)")
        offers.append((assignment.name, offer))
    rebalanced = None
    if repaired:
        peak = max(a.used_bytes / a.usable_bytes for a in assignments if a.used_bytes > 0)
        rebalanced = (f"rounding to whole layers overfilled a node, so the split was rebalanced to the lowest "
                      f"peak use: at most {peak:.0%} of any node's usable memory")
    output_holder = next(a for a in assignments if a.start <= model.n_layer < a.end)
    return _Why(header, tuple(offers), rebalanced, output_holder.name)


def split_among_devices(n_layers: int, weights: Sequence[int]) -> list[int]:
    """A node's layers shared among the devices it serves (several GPUs of one host), by weight (free memory).

    Whole layers by largest remainder, so each device's share is an integer and the node's boundaries in
    llama.cpp's cumulative `tensor_split` stay exact. Ties go to the earlier device.
    """
    if n_layers < 0 or not weights or any(w < 0 for w in weights):
        raise ValueError("need n_layers >= 0 and one non-negative weight per device")
    total = sum(weights)
    if total == 0:
        weights, total = [1] * len(weights), len(weights)
    shares = [n_layers * w // total for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (-(n_layers * weights[i] % total), i))
    for i in remainders[: n_layers - sum(shares)]:
        shares[i] += 1
    return shares
