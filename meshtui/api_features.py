"""Which of the Responses API's features a request used, named for the request log (`serve`'s lines and the
TUI's log).

Decided purely from the request body, after the route has accepted it: a feature named here took effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def route_features(body: Any) -> tuple[str, ...]:
    """The Responses API's instructions and follow-ups."""
    if not isinstance(body, Mapping):
        return ()
    return tuple(name for name in ("instructions", "previous_response_id") if body.get(name))
