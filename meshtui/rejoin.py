"""When a failed host is tried again: a pure policy, run by the orchestrator's background rejoin."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RejoinPolicy:
    """Failed hosts are retried after a hold-out, then with doubling delays while they stay unreachable.

    The hold-out grows with the host's recent losses: a host that keeps flapping (a lid that closes, Wi-Fi that
    drops every few minutes) is held out for longer each time instead of re-planning the mesh on every flap.
    """

    first_delay: float = 5.0
    max_delay: float = 60.0
    max_attempts: int | None = None  # None: keep trying while the mesh is up
    poll_seconds: float = 0.5
    max_hold: float = 600.0  # the longest hold-out after a loss
    flap_window: float = 1800.0  # losses older than this are forgiven

    def recent_losses(self, losses: Sequence[float], now: float) -> int:
        return sum(1 for t in losses if now - t <= self.flap_window)

    def hold_out(self, losses: Sequence[float], now: float) -> float:
        """Seconds to wait after a host's latest loss before the first rejoin attempt (times: monotonic)."""
        return min(self.max_hold, self.first_delay * 2 ** max(0, self.recent_losses(losses, now) - 1))

    def retry_delay(self, attempts: int) -> float:
        """Seconds until the next attempt after `attempts` failed ones."""
        return min(self.max_delay, self.first_delay * 2**attempts)
