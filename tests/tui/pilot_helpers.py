"""Small helpers for driving the app with Textual's Pilot."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot
from textual.widgets import DataTable

from meshtui.tui.app import MeshApp


async def wait_until(pilot: Pilot[Any], condition: Callable[[], bool], timeout: float = 5.0,
                     what: str = "the app") -> None:
    """Let the app run until `condition()` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


def node_row(app: MeshApp, name: str) -> list[str]:
    """The mesh table's row for a node, as plain strings."""
    table = app.nodes_view.query_one(DataTable)
    return [str(cell) for cell in table.get_row(name)]


def provisioning_row(app: MeshApp, name: str) -> list[str]:
    table = app.provisioning.query_one(DataTable)
    return [str(cell) for cell in table.get_row(name)]
