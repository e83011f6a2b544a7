"""The one definition of the latency statistics the core, the TUI and the bench report."""

from __future__ import annotations

from collections.abc import Sequence


def p95_index(n: int) -> int:
    """Index of the 95th percentile by nearest rank in `n` sorted samples (n > 0)."""
    return min(n - 1, max(0, round(0.95 * n) - 1))


def p95(values: Sequence[float]) -> float | None:
    """The 95th percentile by nearest rank (a sample a user can point at); None without samples."""
    if not values:
        return None
    return sorted(values)[p95_index(len(values))]
