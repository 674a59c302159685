"""fedfit.units: parsing and printing bytes and FLOPs, against hand-computed values.

Conventions checked here: decimal prefixes are powers of 1000 and binary ones powers of 1024;
parsed amounts are rounded to the nearest integer, half to even (Decimal's default); printing
uses decimal prefixes only, with three significant figures.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from fedfit import devices, report
from fedfit.units import (
    SI_PREFIXES,
    format_bytes,
    format_flops,
    parse_bytes,
    parse_flops,
    scale_si,
    three_sig_figs,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5 GB", 1_500_000_000),  # 1.5 * 1000**3
        ("48MB", 48_000_000),  # 48 * 1000**2
        ("2MiB", 2_097_152),  # 2 * 1024**2
        ("1.5 KiB", 1_536),  # 1.5 * 1024
        ("1TiB", 1_099_511_627_776),  # 1024**4
        ("300", 300),  # a bare number is bytes
        ("2.5", 2),  # 2.5 rounds half to even
        ("3.5 B", 4),  # 3.5 rounds half to even
        ("0.0000025MB", 2),  # 2.5 bytes
        (7, 7),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5TFLOP", 1_500_000_000_000),  # 1.5 * 1000**4
        ("67.0 GFLOPs", 67_000_000_000),  # "FLOPs" reads as "FLOP"
        ("2PFLOP", 2_000_000_000_000_000),  # 2 * 1000**5
        ("12kFLOP", 12_000),
        ("5e9", 5_000_000_000),  # a bare number is FLOP
        (2.5, 2),  # a float rounds half to even too
    ],
)
def test_parse_flops(text: str | int | float, expected: int) -> None:
    assert parse_flops(text) == expected


@pytest.mark.parametrize(
    ("parse", "text", "match"),
    [
        (parse_bytes, "48mb", r"did you mean 'MB'\? units are case-sensitive"),
        (parse_bytes, "4KB", r"did you mean 'kB'"),
        (parse_bytes, "2GFLOP", r"unknown unit 'GFLOP'"),
        (parse_flops, "2GB", r"unknown unit 'GB'"),
        (parse_flops, "-1", r"not a FLOP amount"),
    ],
)
def test_parse_rejects(parse: Callable[[str], int], text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse(text)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (512, "512 B"),
        (1_500_000, "1.50 MB"),
        (2**20, "1.05 MB"),  # 1_048_576 B: printing is decimal, never MiB
        (999_999, "1.00 MB"),  # 3 s.f. round up to 1000 kB, shown as the next prefix
        (61_234_567, "61.2 MB"),
        (-3_000_000, "-3.00 MB"),
        (float("inf"), "inf B"),
        (None, "n/a"),
    ],
)
def test_format_bytes(n: float | int | None, expected: str) -> None:
    assert format_bytes(n) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [(67e9, "67.0 GFLOP"), (1.2e12, "1.20 TFLOP"), (268e9, "268 GFLOP"), (50, "50 FLOP")],
)
def test_format_flops(n: float, expected: str) -> None:
    assert format_flops(n) == expected


def test_scale_si_and_three_sig_figs() -> None:
    assert scale_si(1_500_000) == (1.5, "M")
    assert scale_si(999_999) == (0.999999, "M")  # 999.999 k would print as "1000 kB"
    assert scale_si(12) == (12, "")
    assert SI_PREFIXES.index("G") == 3  # 1 GB = 1000**3 B
    assert [three_sig_figs(v) for v in (1.5, 12.34, 214.3, 0.999999)] == [
        "1.50",
        "12.3",
        "214",
        "1.00",
    ]


def test_printed_amounts_parse_back() -> None:
    for n in (48_000_000, 2_500_000_000, 512):
        assert parse_bytes(format_bytes(n)) == n
    assert parse_flops(format_flops(20_000_000_000)) == 20_000_000_000


def test_old_homes_re_export() -> None:
    assert devices.parse_bytes is parse_bytes and devices.parse_flops is parse_flops
    assert report.format_bytes is format_bytes and report.format_flops is format_flops


def test_budgets_and_report_do_not_import_matplotlib() -> None:
    # A budget error prints bytes; that must not pull in matplotlib (report.py plots lazily).
    code = (
        "import sys\n"
        "import fedfit.devices, fedfit.report\n"
        "ok, reason = fedfit.devices.Budget(memory_bytes=48_000_000).fits(61_234_567, 0, 0)\n"
        "assert reason == 'memory 61.2 MB > budget 48.0 MB', reason\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
