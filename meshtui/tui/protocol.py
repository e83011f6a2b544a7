"""The surface of `meshtui.mesh.Mesh` the UI uses, so tests can hand the app a scripted fake."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from meshtui import events as ev
from meshtui.inventory import Inventory
from meshtui.mesh import RejoinPolicy


class MeshLike(Protocol):
    """What the app drives. What it shows is read from the events (`meshtui.state`), not from here."""

    parallel: int  # replies in flight at once

    async def up(self) -> None: ...

    def stream(self, *, messages: Sequence[dict[str, str]] | None = None, max_tokens: int = 256,
               temperature: float = 0.7, seed: int = 0, source: str = "") -> AsyncIterator[ev.Event]: ...

    def cancel(self, request_id: int | None = None) -> None: ...

    @property
    def ready(self) -> bool: ...

    async def rejoin(self, name: str) -> None: ...

    def enable_auto_rejoin(self, policy: RejoinPolicy | None = None) -> None: ...

    async def close(self) -> None: ...


class MeshFactory(Protocol):
    def __call__(self, inventory: Inventory, *, accept_new: bool, listener: ev.Listener) -> MeshLike: ...
