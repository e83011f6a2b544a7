"""Coalesce bursts of "something changed" into at most one redraw per interval.

The core's events arrive at token rate (every stage reports every token), and this process also runs the
SSH tunnels that carry those tokens: redrawing on every event would steal time from inference. A view
`poke()`s its throttle on each change; the throttle redraws at once if it has been quiet for `interval`,
otherwise once at the end of the interval, so the last state is always shown.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.message_pump import MessagePump
from textual.timer import Timer


class Throttle:
    def __init__(self, owner: MessagePump, interval: float, flush: Callable[[], None]) -> None:
        self.owner = owner
        self.interval = interval
        self.flush = flush
        self.flushes = 0  # redraws done, for tests and curious readers
        self._last = float("-inf")
        self._timer: Timer | None = None

    def poke(self) -> None:
        if self._timer is not None:
            return  # a redraw is already due; it will see this change too
        wait = self._last + self.interval - time.monotonic()
        if wait <= 0:
            self._run()
        else:
            self._timer = self.owner.set_timer(wait, self._run_from_timer)

    def _run_from_timer(self) -> None:
        self._timer = None
        self._run()

    def _run(self) -> None:
        self._last = time.monotonic()
        self.flushes += 1
        self.flush()
