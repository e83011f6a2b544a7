"""Fixtures for the TUI tests: the app built through `make_app`, around a scripted FakeMesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fake_mesh import FakeMesh, make_inventory

from meshtui.tui.app import MeshApp, make_app

SIZE = (120, 36)


@pytest.fixture
def build_app() -> Callable[..., MeshApp]:
    """`build_app(**fake_kwargs)`: a MeshApp whose mesh is a FakeMesh made with those arguments."""

    def build(**fake_kwargs: Any) -> MeshApp:
        def factory(inventory: Any, *, accept_new: bool, listener: Any) -> FakeMesh:
            return FakeMesh(inventory, listener=listener, **fake_kwargs)

        return make_app(make_inventory(), mesh_factory=factory)

    return build

