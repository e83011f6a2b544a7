"""The sweeps' command-line lists: `--rtt 0,1,2,5`, `--speculative off,auto`, `--concurrency 1,2,4,8`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshtui.engine.protocol import SPECULATIVE_MODES
from meshtui.errors import InventoryError


def parse_list(flag: str, text: str, parse: Callable[[str], Any]) -> tuple[Any, ...]:
    """`--rtt 0,1,2,5` -> (0.0, 1.0, 2.0, 5.0); a bad item is named with its flag."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise InventoryError(f"{flag}: expected a comma-separated list")
    values = []
    for item in items:
        try:
            values.append(parse(item))
        except ValueError as err:
            raise InventoryError(f"{flag}: {item!r} is not valid ({err})") from err
    if len(set(values)) != len(values):
        raise InventoryError(f"{flag}: a value is given twice")
    return tuple(values)


def _rtt(item: str) -> float:
    value = float(item)
    if not 0 <= value <= 1000:
        raise ValueError("expected 0 to 1000 milliseconds")
    return value


def _speculative(item: str) -> str:
    if item not in SPECULATIVE_MODES:
        raise ValueError(f"expected one of {', '.join(SPECULATIVE_MODES)}")
    return item


def _concurrency(item: str) -> int:
    value = int(item)
    if not 1 <= value <= 64:
        raise ValueError("expected 1 to 64 requests")
    return value


def parse_rtt(text: str) -> tuple[float, ...]:
    return parse_list("--rtt", text, _rtt)


def parse_speculative(text: str) -> tuple[str, ...]:
    return parse_list("--speculative", text, _speculative)


def parse_concurrency(text: str) -> tuple[int, ...]:
    return parse_list("--concurrency", text, _concurrency)
