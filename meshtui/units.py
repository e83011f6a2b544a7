"""Byte sizes as people write them in inventories ("4GiB", "1.5GB") and as the UI shows them."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# Decimal units (KB, MB ...) are powers of 1000; binary units (KiB ...) and the bare letters K/M/G/T/P,
# which is how free(1), llama.cpp and most config files mean them, are powers of 1024.
_MULTIPLIERS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "p": 1024**5,
}

_SIZE_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*$")

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(value: str | int, *, where: str) -> int:
    """Return a positive byte count; `where` names the setting in errors ("hosts.toml: gpu1.memory")."""
    hint = "use a positive size such as 4GiB, 512MiB, 1.5GB or 1024"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: {value!r} is not a size ({hint})")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{where}: {value!r} is not a size ({hint})")
        return value
    match = _SIZE_RE.match(value)
    unit = match.group("unit").lower() if match else ""
    if match is None or unit not in _MULTIPLIERS:
        raise ValueError(f"{where}: {value!r} is not a size ({hint})")
    try:
        number = Decimal(match.group("number"))
    except InvalidOperation as err:  # the regex makes this unreachable; keep the message one line anyway
        raise ValueError(f"{where}: {value!r} is not a size ({hint})") from err
    multiplier = _MULTIPLIERS[unit]
    if multiplier == 1 and number != number.to_integral_value():
        raise ValueError(f"{where}: {value!r} is not a whole number of bytes ({hint})")
    size = int(number * multiplier)  # fractions of a byte (1.1KiB = 1126.4) are dropped
    if size <= 0:
        raise ValueError(f"{where}: {value!r} is not a size ({hint})")
    return size


def format_size(n: int) -> str:
    """Binary units with three significant figures: "900 B", "512 MiB", "1.50 GiB", "18.0 GiB"."""
    sign = "-" if n < 0 else ""
    magnitude = abs(n)
    if magnitude < 1024:
        return f"{sign}{magnitude} B"
    value = float(magnitude)
    unit_index = 0
    while value >= 1024 and unit_index < len(_BINARY_UNITS) - 1:
        value /= 1024
        unit_index += 1
    if round(value) >= 1024 and unit_index < len(_BINARY_UNITS) - 1:  # 1023.9 KiB reads better as 1.00 MiB
        value /= 1024
        unit_index += 1
    # Round before choosing decimals so 9.999 MiB prints "10.0 MiB", not "10.00 MiB".
    if round(value, 2) < 10:
        text = f"{value:.2f}"
    elif round(value, 1) < 100:
        text = f"{value:.1f}"
    else:
        text = f"{value:.0f}"
    return f"{sign}{text} {_BINARY_UNITS[unit_index]}"


def transfer_text(done: int, total: int | None) -> str:
    """"1.20 MiB / 2.60 MiB 46%", or just the bytes moved when the total is unknown."""
    if not total:
        return format_size(done)
    percent = min(100, round(100 * done / total))
    return f"{format_size(done)} / {format_size(total)} {percent}%"


def load_transfer(done: int, total: int | None, sent: int | None, rate: float | None, eta: float | None) -> str:
    """A load under way: "12.0 MiB / 42.0 MiB 28% · 15.0 MiB/s · 2s left" (weights in place of planned)."""
    parts = [transfer_text(done, total)]
    if rate is not None:
        parts.append(f"{format_size(int(rate))}/s")
    if eta is not None:
        parts.append(f"{eta:.0f}s left")
    if sent is not None and sent < done // 2:  # most of it was already on the host
        parts.append(f"{format_size(sent)} sent")
    return " · ".join(parts)


def load_done(done: int, sent: int | None) -> str:
    """A finished load: "42.0 MiB" when it all crossed, "42.0 MiB (180 KiB sent)" when the host had most of it."""
    if sent is None or sent >= done:
        return format_size(done)
    return f"{format_size(done)} ({format_size(sent)} sent)"
