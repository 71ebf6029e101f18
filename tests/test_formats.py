"""Times and sizes for people: the unit that fits, checked against hand values."""

from __future__ import annotations

import pytest

from precision_doctor.formats import bytes_unit, format_bytes, format_seconds, seconds_unit


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (3e-7, "300 ns"),
        (0.0003, "300 µs"),
        (2.5, "2.5 s"),
        (0.0, "0 s"),
        (1.5e-12, "0.0015 ns"),
        (4.2e-3, "4.2 ms"),
        (0.99996e-3, "1 ms"),  # rounds up into the next unit, not "1e+03 µs"
        (36.04, "36 s"),
        (123456.0, "123,456 s"),
        (-2.4e-5, "-24 µs"),
        (float("inf"), "inf s"),
    ],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_format_seconds_signed() -> None:
    assert format_seconds(1.5e-6, sign=True) == "+1.5 µs"
    assert format_seconds(-0.25, sign=True) == "-250 ms"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1536, "1.5 KiB"),
        (3 * 2**20, "3 MiB"),
        (1023.9 * 2**20, "1 GiB"),
        (5 * 2**40, "5 TiB"),
    ],
)
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


def test_axis_units() -> None:
    assert seconds_unit(0.0042) == ("ms", 1e-3)
    assert seconds_unit(3e-7) == ("ns", 1e-9)
    assert bytes_unit(3 * 2**20) == ("MiB", 2.0**20)
