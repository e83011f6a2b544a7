from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshtui.units import format_size, parse_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * GiB),
        ("512 MiB", 512 * MiB),
        ("1.5GB", 1_500_000_000),
        ("800M", 800 * MiB),
        ("1024", 1024),
        ("900B", 900),
        ("2 KB", 2000),
        ("3kb", 3000),
        ("1T", TiB),
        ("2TB", 2 * 1000**4),
        ("0.5 GiB", GiB // 2),
        ("1.1KiB", 1126),  # 1126.4 bytes: the fraction of a byte is dropped
        ("  16g  ", 16 * GiB),
        ("1024.0", 1024),
        (".5K", 512),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text, where="test") == expected


def test_parse_size_accepts_positive_ints() -> None:
    assert parse_size(4096, where="test") == 4096


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "4 GiBs", "1e3", "inf", "nan", "-1", "-4GiB", "0", "0GiB", "0.0001K", "1.5", "1.5 B",
     "4 XB", "GiB", "4,5GB", "1_000", 0, -5, True, False, 1.5, None, [4]],
)  # fmt: skip
def test_parse_size_rejects_with_where_and_value(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(bad, where="hosts.toml: gpu1.memory")  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("hosts.toml: gpu1.memory: ")
    assert repr(bad) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (900, "900 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (512 * MiB, "512 MiB"),
        (int(1.5 * GiB), "1.50 GiB"),
        (18 * GiB, "18.0 GiB"),
        (6 * GiB, "6.00 GiB"),
        (MiB - 1, "1.00 MiB"),  # 1023.999 KiB would print as "1024 KiB"
        (int(9.999 * MiB), "10.0 MiB"),
        (int(99.99 * MiB), "100 MiB"),
        (3 * TiB, "3.00 TiB"),
        (-2 * GiB, "-2.00 GiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@given(st.integers(min_value=1, max_value=2**58))
def test_format_size_round_trips_within_rounding(n: int) -> None:
    text = format_size(n)
    number, unit = text.split()
    assert len(number.replace(".", "")) <= 4  # three significant figures (or "1023 B"-style integers)
    back = parse_size(f"{number}{unit}", where="round trip")
    assert abs(back - n) <= max(n * 0.006, 1)
