"""Amounts of bytes, FLOPs and seconds: parsing what users write, printing what fedfit reports.

**Parsing** (``parse_bytes`` / ``parse_flops``). Sizes: ``B``, decimal ``kB MB GB TB`` (powers
of 1000, as ``format_bytes`` prints them) and binary ``KiB MiB GiB TiB`` (powers of 1024).
Units are CASE-SENSITIVE: ``"48mb"`` or ``"2Mb"`` (megabits, as link speeds are quoted) is an
error that suggests ``MB``, because silently reading bits as bytes would be an 8x mistake;
``"KB"`` is refused for the same reason (JEDEC uses it for 1024). Compute: ``FLOP`` with
prefixes ``k M G T P`` (``"20GFLOP"``; ``FLOPs`` also accepted). A bare number is a count of
the base unit (``"5e9"`` FLOP, ``"300"`` bytes); values are rounded to the nearest integer
(half to even: ``"0.0000015MB"`` is 2 bytes).

**Printing** (``format_bytes`` / ``format_flops``): DECIMAL SI prefixes (1 MB = 1e6 bytes,
1 GFLOP = 1e9 FLOP), as network bandwidth and FLOP counts are quoted, with three significant
figures (``format_bytes(1_500_000) == "1.50 MB"``, ``format_flops(67e9) == "67.0 GFLOP"``);
``format_duration`` prints wall time ("12.3 s", "1.4 min", "2.05 h").

Standard library only, so that config validation and budget errors stay light.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

__all__ = [
    "BYTE_UNITS",
    "FLOP_UNITS",
    "SI_PREFIXES",
    "format_bytes",
    "format_flops",
    "parse_bytes",
    "parse_flops",
    "scale_si",
    "three_sig_figs",
]

BYTE_UNITS: dict[str, int] = {
    "B": 1,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_FLOP_PREFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
FLOP_UNITS: dict[str, int] = {
    f"{p}{base}": scale for p, scale in _FLOP_PREFIXES.items() for base in ("FLOP", "FLOPs")
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")

# What the printers put before "B" / "FLOP": powers of 1000, SI_PREFIXES[i] = 1000**i.
SI_PREFIXES = ("", "k", "M", "G", "T", "P", "E")


# --------------------------------------------------------------------------- parsing


def _parse_quantity(text: str | int | float, units: dict[str, int], what: str) -> int:
    """A non-negative number with an optional unit from ``units``, as an integer count."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a {what} amount")
    allowed = ", ".join(units)
    if isinstance(text, int | float):
        value = Decimal(text) if isinstance(text, int) else Decimal(repr(text))
        if not value.is_finite() or value < 0:
            raise ValueError(f"{text!r} is not a non-negative {what} amount")
        return int(value.to_integral_value())
    match = _NUMBER_UNIT.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{text!r} is not a {what} amount: write a number and a unit, e.g. "
            f"{_example(units)}; units: {allowed}"
        )
    number, unit = match.groups()
    if unit and unit not in units:
        near = [u for u in units if u.casefold() == unit.casefold()]
        hint = f" (did you mean {near[0]!r}? units are case-sensitive)" if near else ""
        raise ValueError(f"{text!r}: unknown unit {unit!r}{hint}; units: {allowed}")
    try:
        value = Decimal(number) * units[unit or next(iter(units))]
    except InvalidOperation as err:  # the regex should make this unreachable
        raise ValueError(f"{text!r} is not a {what} amount; units: {allowed}") from err
    return int(value.to_integral_value())


def _example(units: dict[str, int]) -> str:
    return '"48MB", "2MiB"' if "MB" in units else '"20GFLOP", "5e9"'


def parse_bytes(text: str | int) -> int:
    """Bytes from ``"48MB"`` (48_000_000), ``"2MiB"`` (2 * 2**20), ``"300 B"``, ``"300"`` or an int.

    Units are case-sensitive (``BYTE_UNITS``): ``"Mb"`` would be megabits. Raises ``ValueError``
    naming the text and the allowed units.
    """
    return _parse_quantity(text, BYTE_UNITS, "byte")


def parse_flops(text: str | int | float) -> int:
    """FLOPs from ``"20GFLOP"``, ``"1.5TFLOP"``, ``"300MFLOP"``, ``"5e9"`` or a number.

    Prefixes k, M, G, T, P (decimal); ``FLOPs`` is read as ``FLOP``. Raises ``ValueError``.
    """
    return _parse_quantity(text, FLOP_UNITS, "FLOP")


# --------------------------------------------------------------------------- printing


def scale_si(value: float) -> tuple[float, str]:
    """``value`` divided by the largest power of 1000 that keeps it >= 1 after rounding to 3 s.f."""
    i = 0
    # Compare the value rounded to 3 significant figures, so 999_999 B becomes "1.00 MB" and
    # not "1000 kB".
    while i < len(SI_PREFIXES) - 1 and float(f"{value / 1000**i:.3g}") >= 1000:
        i += 1
    return value / 1000**i, SI_PREFIXES[i]


def _human(n: float | int | None, unit: str) -> str:
    """Three significant figures with a decimal SI prefix; plain integers below 1000."""
    if n is None:
        return "n/a"
    x = float(n)
    if not math.isfinite(x):
        return f"{x} {unit}"
    sign = "-" if x < 0 else ""
    v, prefix = scale_si(abs(x))
    if not prefix:
        return f"{sign}{round(v):d} {unit}"
    return f"{sign}{three_sig_figs(v)} {prefix}{unit}"


def three_sig_figs(v: float) -> str:
    """Three significant figures with trailing zeros kept: 1.5 -> "1.50", 214.3 -> "214"."""
    v = float(f"{v:.3g}")
    digits = 2 if abs(v) < 10 else 1 if abs(v) < 100 else 0
    return f"{v:.{digits}f}"


def format_bytes(n: float | int | None) -> str:
    """Bytes with a decimal prefix, 3 significant figures: 1_500_000 -> "1.50 MB", 512 -> "512 B".

    Decimal (1 MB = 10**6 B), not binary (MiB), because link speeds and payload budgets are quoted
    that way. ``None`` -> "n/a".
    """
    return _human(n, "B")


def format_flops(n: float | int | None) -> str:
    """FLOPs with a decimal prefix, 3 significant figures: 67e9 -> "67.0 GFLOP"; ``None`` -> "n/a"."""
    return _human(n, "FLOP")


def format_duration(seconds: float | int | None) -> str:
    """Wall time, short enough for a table cell: "12.3 s", "1.4 min" (below an hour), "2.05 h"."""
    if seconds is None:
        return "n/a"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"
