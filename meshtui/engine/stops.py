"""Stop strings: a reply ends at the first one its text contains, and its text ends before it.

Pure. The step loop feeds each token's text and sends on only what can no longer turn into a stop string: a
tail that could still begin one is held back until the next token says which way it goes.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    """A reply's text as it may be shown, given its stop strings (none: everything is shown at once)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that is safe to show now; after a stop string, `stopped` is set and nothing more is shown."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self.held + text
        cuts = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            self.held = ""
            return buffer[:min(cuts)]
        keep = next((k for k in range(min(len(buffer), max(len(s) for s in self.stops) - 1), 0, -1)
                     if any(s.startswith(buffer[-k:]) for s in self.stops)), 0)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """The reply ended otherwise (end of generation, length, cancel): what was held is text after all."""
        held, self.held = self.held, ""
        return "" if self.stopped else held

    def resume(self, shown_before: str) -> None:
        """A reply resumed after a recovery: its text so far was shown by the attempt before, all but the tail
        that could begin a stop string, which this one holds as that one did."""
        self.feed(shown_before)
