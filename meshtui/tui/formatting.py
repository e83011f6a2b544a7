"""Pure text helpers shared by the views: how layers, bytes and latencies read in a cell."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from meshtui.events import StageLatencyMeasured
from meshtui.stats import p95_index
from meshtui.units import format_size
from meshtui.units import transfer_text as transfer  # noqa: F401 (the views' name for it)

NOT_MEASURED = "—"


def layer_range(layers: tuple[int, int] | Sequence[int] | None, n_layer: int | None,
                plus_output: bool = False) -> str:
    """`(25, 31)` with 30 blocks reads "25–29+out": layer index n_layer is llama.cpp's output layer.

    `plus_output`: the node also holds the output layer apart from its blocks (the head's local stage).
    """
    if plus_output:
        return layer_range(layers, n_layer) + "+out"
    if not layers:
        return NOT_MEASURED
    start, end = int(layers[0]), int(layers[1])
    if end <= start:
        return NOT_MEASURED
    last = end - 1
    if n_layer is not None and last == n_layer:
        if last == start:
            return "out"
        return f"{start}+out" if last - 1 == start else f"{start}–{last - 1}+out"
    return str(start) if last == start else f"{start}–{last}"


def latency_split(total_ms: float, network_ms: float) -> str:
    """"7.4 (6.3+1.1)": the total, then compute + network (the node's round trip, at most the total)."""
    network = min(max(network_ms, 0.0), total_ms)
    return f"{total_ms:.1f} ({total_ms - network:.1f}+{network:.1f})"


def latency_columns(samples: Sequence[StageLatencyMeasured]) -> list[str]:
    """Last, mean and p95 per-token latency of one stage, each split as the core measured it.

    The p95 sample is picked by `meshtui.stats.p95_index`, as the core picks it, so the totals agree with the core's.
    """
    if not samples:
        return [NOT_MEASURED] * 3
    last = samples[-1]
    ordered = sorted(samples, key=lambda s: s.total_ms)
    p95 = ordered[p95_index(len(ordered))]
    mean_total = statistics.fmean(s.total_ms for s in samples)
    mean_network = statistics.fmean(min(s.network_ms, s.total_ms) for s in samples)
    return [
        latency_split(last.total_ms, last.network_ms),
        latency_split(mean_total, mean_network),
        latency_split(p95.total_ms, p95.network_ms),
    ]


def latency_totals(samples: Sequence[StageLatencyMeasured]) -> list[str]:
    """Last, mean and p95 per-token totals of one stage, for a narrow table (p95 picked as the core does)."""
    if not samples:
        return [NOT_MEASURED] * 3
    totals = [s.total_ms for s in samples]
    ordered = sorted(totals)
    return [f"{totals[-1]:.1f}", f"{statistics.fmean(totals):.1f}", f"{ordered[p95_index(len(ordered))]:.1f}"]


def memory_use(planned_bytes: int, usable_bytes: int) -> str:
    if not usable_bytes:
        return NOT_MEASURED
    return f"{format_size(planned_bytes)} / {format_size(usable_bytes)}"


def bytes_or_dash(n: float | None) -> str:
    return NOT_MEASURED if n is None else format_size(round(n))


def proportional_widths(weights: Sequence[int], width: int) -> list[int]:
    """Split `width` cells in proportion to `weights` (largest remainder), every positive weight >= 1 cell."""
    total = sum(w for w in weights if w > 0)
    if total <= 0 or width <= 0:
        return [0 for _ in weights]
    exact = [width * w / total if w > 0 else 0.0 for w in weights]
    cells = [int(x) for x in exact]
    for i, w in enumerate(weights):
        if w > 0 and cells[i] == 0 and sum(cells) < width:
            cells[i] = 1
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in order:
        if sum(cells) >= width:
            break
        if weights[i] > 0:
            cells[i] += 1
    while sum(cells) > width:  # the >= 1 rule overshot: take from the widest
        widest = max(range(len(cells)), key=lambda i: cells[i])
        cells[widest] -= 1
    return cells


def replies_in_flight(sources: Sequence[str]) -> str:
    """Whose replies the engine is generating: `("chat", "api", "api")` reads "3 in flight: api 2, chat"."""
    if not sources:
        return ""
    counts: dict[str, int] = {}
    for source in sources:
        counts[source or "other"] = counts.get(source or "other", 0) + 1
    parts = [name if n == 1 else f"{name} {n}" for name, n in sorted(counts.items())]
    return f"{len(sources)} in flight: {', '.join(parts)}"
