"""One error hierarchy. Every expected failure is a MeshError with a one-line message for the user."""

from __future__ import annotations

from collections.abc import Sequence

from meshtui.text import printable


class MeshError(Exception):
    """An expected failure. `str(err)` is the one line shown to the user: "host: reason", or the reason alone.

    The host and the reason stay fields, so nobody takes the message apart again.
    """

    exit_code = 1

    def __init__(self, message: str, *, host: str | None = None) -> None:
        self.host = host
        self.reason = printable(message)
        # Messages quote what hosts, files and clients said: no control character reaches a terminal.
        super().__init__(printable(f"{host}: {message}" if host else message))


class InventoryError(MeshError):
    """The inventory file is missing, unreadable or invalid."""

    exit_code = 2


class ModelError(MeshError):
    """The model file is missing, unreadable or not a usable GGUF."""

    exit_code = 2


class PlanError(MeshError):
    """The model cannot be split over the nodes (it does not fit)."""

    exit_code = 3


class HostError(MeshError):
    """A host could not be reached, authenticated, probed, provisioned or kept alive.

    `code` is the agent's own code for why it cannot serve (e.g. "cannot_load": the pushed runtime does not load
    there), when the agent said one.
    """

    exit_code = 4

    def __init__(self, message: str, *, host: str | None = None, code: str | None = None) -> None:
        super().__init__(message, host=host)
        self.code = code


class EngineError(MeshError):
    """The engine process failed to start, load or generate."""

    exit_code = 5


def raise_first(results: Sequence[object]) -> None:
    """After a gather across hosts: a bug (not a MeshError) wins, else the first host's failure."""
    errors = [r for r in results if isinstance(r, BaseException)]
    for err in errors:
        if not isinstance(err, MeshError):
            raise err
    if errors:
        raise errors[0]
