"""Device budgets: unit parsing, fits() reasons, tier assignment, fractions, traces, config errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedfit.config import build_dataclass
from fedfit.devices import (
    Budget,
    DevicesConfig,
    Population,
    Reference,
    build_population,
    format_budget,
    parse_bytes,
    parse_flops,
    resolve_tiers,
    tier_counts,
)
from fedfit.errors import ConfigError

# Round numbers, so fractions are easy to check by hand.
REF = Reference(
    memory_bytes=400_000_000,
    flops_per_round=80 * 10**9,
    upload_bytes=90_000_000,
    download_bytes=90_000_000,
)


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48MB", 48_000_000),
        ("1.5GB", 1_500_000_000),
        ("512kB", 512_000),
        ("2MiB", 2 * 2**20),
        ("1.5 KiB", 1536),
        ("1GiB", 2**30),
        ("2TB", 2 * 10**12),
        ("300 B", 300),
        ("300", 300),
        (" 0.5MB ", 500_000),
        ("1e3kB", 1_000_000),
        ("0.0000015MB", 2),  # 1.5 bytes rounds half to even
        (123, 123),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("48mb", "did you mean 'MB'"),  # case-sensitive: mb/Mb would be milli/mega-bits
        ("2Mb", "did you mean 'MB'"),
        ("4KB", "did you mean 'kB'"),
        ("48 megabytes", "unknown unit 'megabytes'"),
        ("MB", "not a byte amount"),
        ("-1MB", "not a byte amount"),
        ("", "not a byte amount"),
        ("1.2.3MB", "not a byte amount"),
        ("20GFLOP", "unknown unit 'GFLOP'"),
        (-5, "non-negative"),
        (True, "not a byte amount"),
    ],
)
def test_parse_bytes_rejects(text: str | int, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        parse_bytes(text)
    if isinstance(text, str) and text:
        assert repr(text) in str(err.value)
    if isinstance(text, str):
        assert "KiB" in str(err.value) and "MB" in str(err.value)  # lists the allowed units


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GFLOP", 20 * 10**9),
        ("1.5TFLOP", 1_500_000_000_000),
        ("300MFLOP", 300_000_000),
        ("67.0 GFLOPs", 67 * 10**9),
        ("5e9", 5 * 10**9),
        ("12kFLOP", 12_000),
        (5e9, 5 * 10**9),
        (7, 7),
    ],
)
def test_parse_flops(text: str | int | float, expected: int) -> None:
    assert parse_flops(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("20gflop", "did you mean 'GFLOP'"),
        ("20GB", "unknown unit 'GB'"),
        ("fast", "not a FLOP amount"),
        (float("inf"), "non-negative"),
        (-1.0, "non-negative"),
    ],
)
def test_parse_flops_rejects(text: str | float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_flops(text)


# --------------------------------------------------------------------------- budgets


def test_fits_names_first_exceeded_resource() -> None:
    budget = Budget(memory_bytes=48_000_000, flops_per_round=20 * 10**9, upload_bytes=2_000_000)
    assert budget.fits(48_000_000, 20 * 10**9, 2_000_000, 10**12) == (True, "")  # equal fits
    assert budget.fits(61_200_000, 30 * 10**9, 3_000_000) == (
        False,
        "memory 61.2 MB > budget 48.0 MB",
    )
    assert budget.fits(1, 25 * 10**9, 3_000_000) == (False, "flops 25.0 GFLOP > budget 20.0 GFLOP")
    assert budget.fits(1, 1, 2_000_001) == (
        False,
        "upload 2.00 MB (2000001) > budget 2.00 MB (2000000)",
    )
    dl = Budget(download_bytes=1000)
    assert dl.fits(10**15, 10**20, 10**15, 999) == (True, "")
    assert dl.fits(0, 0, 0, 1500) == (False, "download 1.50 kB > budget 1.00 kB")


def test_budget_validation_and_format() -> None:
    assert Budget().unlimited and format_budget(Budget()) == "unlimited"
    b = Budget(48_000_000, None, 2 * 2**20)
    assert not b.unlimited
    assert format_budget(b) == "memory 48.0 MB, upload 2.10 MB" == str(b)
    with pytest.raises(ValueError, match="memory_bytes"):
        Budget(memory_bytes=-1)
    with pytest.raises(TypeError, match="flops_per_round"):
        Budget(flops_per_round=1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tiers


def _tiers_cfg(*tiers: str, **table: str) -> DevicesConfig:
    return DevicesConfig(population="tiers", tiers=tiers, **table)


def test_tier_counts_largest_remainder() -> None:
    # 10 * (0.125, 0.25, 0.5, 0.125) = 1.25, 2.5, 5, 1.25: floors 1,2,5,1 (9); one left goes to
    # the largest remainder 0.5 (tier 1).
    assert tier_counts([0.125, 0.25, 0.5, 0.125], 10) == [1, 3, 5, 1]
    # Ties go to the earlier tier: 3 tiers of 1/3 over 100 -> 34, 33, 33.
    assert tier_counts([1 / 3, 1 / 3, 1 / 3], 100) == [34, 33, 33]
    assert tier_counts([0.1] * 10, 7) == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert tier_counts([0.25] * 4, 100) == [25] * 4


def test_tier_assignment_exact_and_seeded() -> None:
    cfg = _tiers_cfg(
        "xs share=1/8 memory=50MB",
        "s share=0.25 memory=100MB",
        "m share=0.5 memory=200MB",
        "l share=0.125",
        upload="2MB",  # table-level value applies to every tier that does not set its own
    )
    pop = build_population(cfg, 100, None, seed=3)
    counts = Counter(pop.tier_names)
    # 100 * (1/8, 1/4, 1/2, 1/8) = 12.5, 25, 50, 12.5 -> 13, 25, 50, 12 (tie to the earlier tier)
    assert counts == {"xs": 13, "s": 25, "m": 50, "l": 12}
    assert len(pop) == 100
    for budget, name in zip(pop.budgets, pop.tier_names, strict=True):
        memory = {"xs": 50_000_000, "s": 100_000_000, "m": 200_000_000, "l": None}[name]
        assert budget == Budget(memory, None, 2_000_000, None)
    again = build_population(cfg, 100, None, seed=3)
    assert again == pop  # deterministic in the seed
    other = build_population(cfg, 100, None, seed=4)
    assert Counter(other.tier_names) == counts and other.tier_names != pop.tier_names
    groups = pop.groups()
    assert [g.name for g in groups] == ["xs", "s", "m", "l"]  # config order, not id order
    assert [len(g.client_ids) for g in groups] == [13, 25, 50, 12]
    assert sorted(c for g in groups for c in g.client_ids) == list(range(100))
    assert all(pop[c] == g.budget for g in groups for c in g.client_ids)


def test_fractions_relative_to_reference() -> None:
    cfg = _tiers_cfg(
        "eighth share=0.25 memory=0.125x",
        "quarter share=0.25 memory=1/4x flops=0.5x",
        "half share=0.25 memory=0.5x upload=1MB",
        "full share=0.25 memory=1x",
        upload="0.1x",
    )
    tiers = resolve_tiers(cfg, REF)
    assert [t.budget for t in tiers] == [
        Budget(50_000_000, None, 9_000_000),
        Budget(100_000_000, 40 * 10**9, 9_000_000),
        Budget(200_000_000, None, 1_000_000),
        Budget(400_000_000, None, 9_000_000),
    ]
    assert [t.share for t in tiers] == [0.25] * 4
    assert cfg.needs_reference
    with pytest.raises(ConfigError, match=r"devices\.tiers\[0\] \(eighth\).*needs the reference"):
        build_population(cfg, 8, None, seed=0)
    homo = DevicesConfig(memory="0.25x", flops="20GFLOP", download="1/3x")
    pop = build_population(homo, 5, REF, seed=0)
    assert set(pop.budgets) == {Budget(100_000_000, 20 * 10**9, None, 30_000_000)}
    assert pop.tier_names == ("all",) * 5
    with pytest.raises(ConfigError, match=r"devices\.memory: '0\.25x' is a fraction"):
        build_population(homo, 5, None, seed=0)
    assert not DevicesConfig(memory="48MB").needs_reference


def test_default_is_unlimited() -> None:
    pop = build_population(DevicesConfig(), 3, None, seed=0)
    assert pop == Population((Budget(),) * 3, ("all",) * 3)


# --------------------------------------------------------------------------- traces


def _trace(tmp_path: Path, text: str) -> DevicesConfig:
    path = tmp_path / "budgets.csv"
    path.write_text(text)
    return DevicesConfig(population="trace", trace=str(path))


def test_trace_good(tmp_path: Path) -> None:
    cfg = _trace(
        tmp_path,
        "client_id,memory,flops,upload,download,tier\n"
        "2, 48MB, 20GFLOP, 2MB, , phone\n"
        "0,0.5x,,1MiB,4MB,laptop\n"
        "\n"
        "1,64MB,0.25x,,,\n",
    )
    pop = build_population(cfg, 3, REF, seed=0)
    assert pop.budgets == (
        Budget(200_000_000, None, 2**20, 4_000_000),
        Budget(64_000_000, 20 * 10**9, None, None),
        Budget(48_000_000, 20 * 10**9, 2_000_000, None),
    )
    assert pop.tier_names == ("laptop", "trace", "phone")
    # A relative path is read from base_dir (the config's folder).
    rel = DevicesConfig(population="trace", trace="budgets.csv")
    assert build_population(rel, 3, REF, seed=0, base_dir=tmp_path) == pop


HEADER = "client_id,memory,flops,upload\n"


@pytest.mark.parametrize(
    ("rows", "num_clients", "match"),
    [
        # missing and extra ids are listed as ranges
        ("0,1MB,,\n5,1MB,,\n9,1MB,,\n", 5, r"missing ids 1-4; extra ids 5, 9 \(data"),
        # a bad unit names file:line and the column (line 3: the header is line 1)
        ("0,1MB,,\n1,48mb,,\n", 2, r"budgets\.csv:3: column 'memory'.*did you mean 'MB'"),
        ("0,1MB,20GB,\n", 1, r"budgets\.csv:2: column 'flops'.*unknown unit 'GB'"),
        ("0,1MB,,\n0,2MB,,\n", 1, r"budgets\.csv:3: client_id 0 already given on line 2"),
        ("zero,1MB,,\n", 1, r"budgets\.csv:2: client_id 'zero' is not"),
        ("0,1MB,,,7\n", 1, r"budgets\.csv:2: more cells"),
        ("0,1MB\n", 1, r"budgets\.csv:2: fewer cells"),
        ("0,0.5x,,\n", 1, r"budgets\.csv:2: column 'memory'.*needs the reference"),
    ],
    ids=["ids", "unit", "flops-unit", "duplicate", "bad-id", "long-row", "short-row", "fraction"],
)
def test_trace_bad(tmp_path: Path, rows: str, num_clients: int, match: str) -> None:
    cfg = _trace(tmp_path, HEADER + rows)
    with pytest.raises(ConfigError, match=match):
        build_population(cfg, num_clients, None, seed=0)


def test_trace_bad_header(tmp_path: Path) -> None:
    cfg = _trace(tmp_path, "client_id,memory,upload,speed\n0,1MB,,\n")
    match = r"budgets\.csv:1: .*missing columns \['flops'\].*unknown columns \['speed'\]"
    with pytest.raises(ConfigError, match=match):
        build_population(cfg, 1, None, seed=0)


def test_trace_missing_file(tmp_path: Path) -> None:
    cfg = DevicesConfig(population="trace", trace=str(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match=r"devices\.trace: .*nope\.csv.* does not exist"):
        build_population(cfg, 2, None, 0)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"population": "cohorts"}, r"devices\.population: 'cohorts' is not one of"),
        ({"memory": "48mb"}, r"devices\.memory: .*did you mean 'MB'"),
        ({"flops": "20GB"}, r"devices\.flops: .*unknown unit 'GB'"),
        ({"upload": "0.1y"}, r"devices\.upload:"),
        ({"download": "ax"}, r"devices\.download: 'ax' is not a fraction"),
        ({"memory": 48}, r"devices\.memory: expected a string"),
        ({"memroy": "48MB"}, r"devices\.memroy: unknown key \(did you mean 'memory'\?\)"),
        ({"tiers": ["a share=1"]}, r"devices\.tiers: only used with population = 'tiers'"),
        ({"population": "tiers"}, r"devices\.tiers: population = 'tiers' needs at least one"),
        (
            {"population": "tiers", "tiers": ["a share=0.5", "b share=0.4"]},
            r"devices\.tiers: shares sum to 0\.9, not 1",
        ),
        (
            {"population": "tiers", "tiers": ["a share=0.5", "a share=0.5"]},
            r"devices\.tiers\[1\]: duplicate",
        ),
        (
            {"population": "tiers", "tiers": ["a memory=1MB"]},
            r"devices\.tiers\[0\]: tier 'a' needs share=",
        ),
        (
            {"population": "tiers", "tiers": ["a share=1 mem=1MB"]},
            r"devices\.tiers\[0\]: 'mem=1MB'",
        ),
        (
            {"population": "tiers", "tiers": ["a share=1 memory=1Mb"]},
            r"devices\.tiers\[0\]: tier 'a': memory:",
        ),
        (
            {"population": "tiers", "tiers": ["a share=2"]},
            r"devices\.tiers\[0\]: tier 'a': share must be",
        ),
        ({"population": "tiers", "tiers": ["share=1"]}, r"devices\.tiers\[0\]: .*must start with"),
        ({"population": "trace"}, r"devices\.trace: population = 'trace' needs a CSV path"),
        ({"population": "trace", "trace": "t.csv", "memory": "1MB"}, r"devices\.memory: not used"),
        ({"trace": "t.csv"}, r"devices\.trace: only used with population = 'trace'"),
    ],
)
def test_config_errors_name_the_key(values: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_dataclass(DevicesConfig, values, "devices")


def test_config_from_toml_values() -> None:
    cfg = build_dataclass(
        DevicesConfig,
        {"population": "tiers", "tiers": ["a share=1/3", "b share=1/3", "c share=0.333333"]},
        "devices",
    )
    assert cfg.tiers == ("a share=1/3", "b share=1/3", "c share=0.333333")  # within 1e-6 of 1
    assert not cfg.needs_reference
