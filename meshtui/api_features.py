"""Which of the tools and Responses features a request used, named for the request log (`serve`'s lines and the
TUI's log); the sampling side (response_format, n, logprobs, top_p, ...) is `GenerationRequest.features`.

Decided purely from the request body, after the route has accepted it: a feature named here took effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshtui.api_tools import uses_tool_turns


def route_features(body: Any) -> tuple[str, ...]:
    """Tools (and a tool_choice other than auto), tool results in the turns, the Responses API's instructions and
    follow-ups."""
    if not isinstance(body, Mapping):
        return ()
    found: list[str] = []
    if body.get("tools"):
        found.append("tools")
        choice = body.get("tool_choice")
        if isinstance(choice, Mapping):
            found.append("tool_choice=function")
        elif isinstance(choice, str) and choice != "auto":
            found.append(f"tool_choice={choice}")
    if uses_tool_turns(body.get("messages")):
        found.append("tool_results")
    found += [name for name in ("instructions", "previous_response_id") if body.get(name)]
    return tuple(found)
