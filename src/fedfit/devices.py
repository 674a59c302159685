"""Device budgets and device populations: what each client can afford per round.

A **budget** bounds one client's round: peak training memory (bytes), compute (FLOPs per round),
upload and download (bytes per round). ``None`` means unlimited. Budgets are written in TOML with
units; the ``[devices]`` table (``DevicesConfig``) describes the whole **population**:

- ``homogeneous``: every client has the table's ``memory`` / ``flops`` / ``upload`` / ``download``.
- ``tiers``: shares of the population with their own budgets, e.g. four equal tiers with 1/8, 1/4,
  1/2 and 1x of full fine-tuning memory (the setting of Pfeiffer et al., arXiv 2411.07826). Each
  tier is one string ``"<name> share=<s> [memory=..] [flops=..] [upload=..] [download=..]"``; a key
  the tier leaves out takes the table-level value (so ``upload = "2MB"`` once bounds every tier),
  and a key set nowhere is unlimited. Clients get tiers in exact counts (largest remainder), then a
  seeded permutation decides which ids.
- ``trace``: a CSV of per-device budgets, columns ``client_id,memory,flops,upload[,download][,tier]``.

**Units** (``parse_bytes`` / ``parse_flops``, from ``fedfit.units``). Sizes: ``B``, decimal
``kB MB GB TB`` (powers of 1000, as ``fedfit.units.format_bytes`` prints them) and binary
``KiB MiB GiB TiB`` (powers of 1024). Units are CASE-SENSITIVE: ``"48mb"`` or ``"2Mb"``
(megabits) is an error that suggests ``MB``; ``"KB"`` is refused too. Compute: ``FLOP`` with
prefixes ``k M G T P`` (``"20GFLOP"``; ``FLOPs`` also accepted). A bare number is a count of the
base unit (``"5e9"`` FLOP, ``"300"`` bytes); values are rounded to the nearest integer.

**Fractions of full fine-tuning**: ``"0.25x"`` or ``"1/8x"`` means that fraction of a
``Reference`` (full fine-tuning's cost for the run's model and batch shape, from
``fedfit.costs``): memory of its peak memory, flops of its per-round FLOPs, upload/download of
its full-model payload. A fraction with no Reference given is an error, never a guess.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from fedfit.errors import ConfigError
from fedfit.units import (  # BYTE_UNITS, FLOP_UNITS and the parsers are re-exported
    BYTE_UNITS,
    FLOP_UNITS,
    format_bytes,
    format_flops,
    parse_bytes,
    parse_flops,
)

__all__ = [
    "BYTE_UNITS",
    "FLOP_UNITS",
    "POPULATIONS",
    "Budget",
    "DevicesConfig",
    "Population",
    "Reference",
    "Tier",
    "TierGroup",
    "build_population",
    "format_budget",
    "parse_bytes",
    "parse_flops",
    "read_trace",
    "resolve_tiers",
    "tier_counts",
]

POPULATIONS = ("homogeneous", "tiers", "trace")
RESOURCES = ("memory", "flops", "upload", "download")
# How a device behaves rather than what it affords: simulated churn and stragglers.
TRAITS = ("dropout", "speed", "bandwidth")

# Shares must sum to 1 within this (so three tiers of 0.333333 are accepted).
SHARE_TOLERANCE = 1e-6
# Salt for the tier permutation's seed, so tier assignment is not correlated with other draws
# made from the same run seed (client sampling, data partition). ASCII of "tiers".
_TIER_SALT = 0x7469657273


# --------------------------------------------------------------------------- amounts


def _parse_fraction(text: str) -> Fraction | None:
    """``"0.25x"`` / ``"1/8x"`` -> Fraction; ``None`` when ``text`` is not a fraction form."""
    stripped = text.strip()
    if not stripped.endswith("x"):
        return None
    try:
        value = Fraction(stripped[:-1].strip())
    except (ValueError, ZeroDivisionError):
        msg = f"{text!r} is not a fraction of full fine-tuning (e.g. '0.25x', '1/8x')"
        raise ValueError(msg) from None
    if value < 0:
        raise ValueError(f"{text!r}: a fraction must be >= 0")
    return value


def _check_amount(text: str, resource: str) -> None:
    """Raise ``ValueError`` if ``text`` is neither empty, a fraction, nor an amount of ``resource``."""
    if not text.strip() or _parse_fraction(text) is not None:
        return
    (parse_flops if resource == "flops" else parse_bytes)(text)


# --------------------------------------------------------------------------- budgets


def _fmt_bytes(n: int | None) -> str:
    return "unlimited" if n is None else format_bytes(n)


def _fmt_flops(n: int | None) -> str:
    return "unlimited" if n is None else format_flops(n)


@dataclass(frozen=True)
class Budget:
    """What one device affords in one round; ``None`` = unlimited.

    ``memory_bytes`` bounds the peak of a training step (weights, grads, optimiser state,
    activations); ``flops_per_round`` the local work of a round; ``upload_bytes`` /
    ``download_bytes`` the serialised payloads of a round.
    """

    memory_bytes: int | None = None
    flops_per_round: int | None = None
    upload_bytes: int | None = None
    download_bytes: int | None = None
    # simulated behaviour (TRAITS): the chance of dropping out of a round it was sampled
    # for, and compute (FLOP/s) and link (bytes/s) speeds that set its round's duration
    # against ``run.deadline_s``
    dropout: float = 0.0
    flops_per_s: int | None = None
    bytes_per_s: int | None = None

    @property
    def constrained(self) -> bool:
        """Whether any cost is bounded (memory, FLOPs, upload or download)."""
        return any(
            v is not None
            for v in (
                self.memory_bytes,
                self.flops_per_round,
                self.upload_bytes,
                self.download_bytes,
            )
        )

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ValueError(f"Budget.dropout must be in [0, 1), got {self.dropout}")
        for name in (
            "memory_bytes",
            "flops_per_round",
            "upload_bytes",
            "download_bytes",
            "flops_per_s",
            "bytes_per_s",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"Budget.{name} must be an int or None, got {value!r}")
            if value is not None and value < 0:
                raise ValueError(f"Budget.{name} must be >= 0, got {value}")

    def fits(self, memory: int, flops: int, upload: int, download: int = 0) -> tuple[bool, str]:
        """``(True, "")`` if every cost is within budget, else ``(False, reason)``.

        The reason names the FIRST exceeded resource, checked in the order memory, flops, upload,
        download, in human units: ``"memory 61.2 MB > budget 48.0 MB"`` (exact counts are added
        when the rounded numbers print the same). Equal to the budget fits.
        """
        checks = (
            ("memory", memory, self.memory_bytes, _fmt_bytes),
            ("flops", flops, self.flops_per_round, _fmt_flops),
            ("upload", upload, self.upload_bytes, _fmt_bytes),
            ("download", download, self.download_bytes, _fmt_bytes),
        )
        for name, cost, limit, fmt in checks:
            if limit is not None and cost > limit:
                shown, allowed = fmt(cost), fmt(limit)
                if shown == allowed:  # 3 significant figures hide the difference: show both exact
                    shown, allowed = f"{shown} ({cost})", f"{allowed} ({limit})"
                return False, f"{name} {shown} > budget {allowed}"
        return True, ""

    @property
    def unlimited(self) -> bool:
        """True when no resource is bounded."""
        return all(
            v is None
            for v in (
                self.memory_bytes,
                self.flops_per_round,
                self.upload_bytes,
                self.download_bytes,
            )
        )

    def __str__(self) -> str:
        return format_budget(self)

    @classmethod
    def of(cls, amounts: Sequence[int | None], **traits: Any) -> Budget:
        """A budget from its four amounts in ``RESOURCES`` order, and behaviour fields."""
        memory, flops, upload, download = amounts
        return cls(memory, flops, upload, download, **traits)

    def round_seconds(self, flops: int, transferred_bytes: int) -> float | None:
        """The simulated duration of a round of ``flops`` and ``transferred_bytes`` (download
        plus upload) on this device; None when it has neither speed."""
        if self.flops_per_s is None and self.bytes_per_s is None:
            return None
        compute = flops / self.flops_per_s if self.flops_per_s else 0.0
        transfer = transferred_bytes / self.bytes_per_s if self.bytes_per_s else 0.0
        return compute + transfer


def format_budget(budget: Budget) -> str:
    """One line for logs and tables: ``"memory 48.0 MB, flops 20.0 GFLOP, upload 2.00 MB"``.

    Unbounded resources are left out (download is usually unbounded); an unlimited budget is
    ``"unlimited"``. Units are ``fedfit.units``' (decimal SI, 3 significant figures).
    """
    parts = [
        f"{name} {fmt(value)}"
        for name, value, fmt in (
            ("memory", budget.memory_bytes, _fmt_bytes),
            ("flops", budget.flops_per_round, _fmt_flops),
            ("upload", budget.upload_bytes, _fmt_bytes),
            ("download", budget.download_bytes, _fmt_bytes),
        )
        if value is not None
    ]
    return ", ".join(parts) if parts else "unlimited"


@dataclass(frozen=True)
class Reference:
    """What ``"1x"`` means: full fine-tuning's cost for this run's model and batch shape.

    ``memory_bytes``: peak memory of one full fine-tuning step; ``flops_per_round``: its FLOPs
    per round; ``upload_bytes`` / ``download_bytes``: the full model's payload per round.
    """

    memory_bytes: int
    flops_per_round: int
    upload_bytes: int
    download_bytes: int

    def amount(self, resource: str) -> int:
        """The reference amount of ``resource`` (one of memory, flops, upload, download)."""
        return {
            "memory": self.memory_bytes,
            "flops": self.flops_per_round,
            "upload": self.upload_bytes,
            "download": self.download_bytes,
        }[resource]


def _resolve(text: str, resource: str, reference: Reference | None, where: str) -> int | None:
    """An amount string (empty, units, or a fraction ``"0.25x"``) -> int or None (unlimited).

    ``where`` names the source in errors (``devices.memory``, ``trace.csv:4``). Fractions are
    rounded to the nearest integer.
    """
    if not text.strip():
        return None
    try:
        fraction = _parse_fraction(text)
        if fraction is None:
            return parse_flops(text) if resource == "flops" else parse_bytes(text)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err
    if reference is None:
        raise ConfigError(
            f"{where}: {text.strip()!r} is a fraction of full fine-tuning, which needs the "
            "reference costs of the model (none was given)"
        )
    return round(fraction * reference.amount(resource))


def _trait(text: str | float, trait: str) -> float | int | None:
    """A behaviour value (``TRAITS``): ``dropout`` a probability in [0, 1), ``speed`` FLOP
    per second, ``bandwidth`` bytes per second (units as for budgets); None when empty."""
    if isinstance(text, str) and not text.strip():
        return None
    if trait == "dropout":
        try:
            p = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a probability (e.g. 0.1)") from None
        if not 0 <= p < 1:
            raise ValueError(f"{text!r}: a dropout probability must be in [0, 1)")
        return p
    text = str(text)
    value = parse_flops(text) if trait == "speed" else parse_bytes(text)
    if value <= 0:
        raise ValueError(f"{text!r}: a speed must be > 0")
    return value


def behaviour(texts: dict[str, Any]) -> dict[str, Any]:
    """Budget's behaviour fields from the ``TRAITS`` texts (validated by the config)."""
    dropout, speed, bandwidth = (_trait(texts[t], t) for t in TRAITS)
    return {"dropout": dropout or 0.0, "flops_per_s": speed, "bytes_per_s": bandwidth}


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DevicesConfig:
    """The ``[devices]`` table: the client population's budgets (see the module docstring)."""

    population: str = field(default="homogeneous", metadata={"help": "homogeneous | tiers | trace"})
    memory: str = field(
        default="",
        metadata={"help": 'peak memory, "48MB" or "0.25x" of full fine-tuning; "" = unlimited'},
    )
    flops: str = field(
        default="", metadata={"help": 'FLOPs per round, "20GFLOP" or "0.5x"; "" = unlimited'}
    )
    upload: str = field(
        default="", metadata={"help": 'upload per round, "2MB" or "0.1x"; "" = unlimited'}
    )
    download: str = field(
        default="", metadata={"help": 'download per round, "2MB" or "0.1x"; "" = unlimited'}
    )
    tiers: tuple[str, ...] = field(
        default=(),
        metadata={"help": 'population="tiers": "<name> share=<s> [memory=..] [flops=..] ...'},
    )
    trace: str = field(
        default="",
        metadata={"help": 'population="trace": CSV client_id,memory,flops,upload[,download]'},
    )
    margin: float = field(
        default=0.05,
        metadata={"help": "safety margin on predicted memory and FLOPs when fitting budgets"},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "chance that a sampled device drops out of the round"}
    )
    speed: str = field(
        default="",
        metadata={"help": 'compute speed in FLOP per second, "5GFLOP"; "" = not simulated'},
    )
    bandwidth: str = field(
        default="",
        metadata={"help": 'link speed in bytes per second, "1MB"; "" = not simulated'},
    )

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1:
            raise ConfigError("devices.margin: must be in [0, 1)")
        if self.population not in POPULATIONS:
            allowed = ", ".join(map(repr, POPULATIONS))
            raise ConfigError(f"devices.population: {self.population!r} is not one of {allowed}")
        for resource in RESOURCES:
            text = getattr(self, resource)
            try:
                _check_amount(text, resource)
            except ValueError as err:
                raise ConfigError(f"devices.{resource}: {err}") from err
            if text.strip() and self.population == "trace":
                raise ConfigError(
                    f"devices.{resource}: not used with population = 'trace' (the trace file "
                    "gives every budget); remove it"
                )
        for trait in TRAITS:
            try:
                _trait(getattr(self, trait), trait)
            except ValueError as err:
                raise ConfigError(f"devices.{trait}: {err}") from err
        if self.population == "tiers":
            _parse_tier_specs(self.tiers)  # raises ConfigError naming devices.tiers
        elif self.tiers:
            raise ConfigError("devices.tiers: only used with population = 'tiers'")
        if self.population == "trace" and not self.trace.strip():
            raise ConfigError("devices.trace: population = 'trace' needs a CSV path")
        if self.population != "trace" and self.trace:
            raise ConfigError("devices.trace: only used with population = 'trace'")

    @property
    def needs_reference(self) -> bool:
        """True if the table or a tier uses a fraction (``"0.25x"``); a trace may too (not read)."""
        texts = [getattr(self, r) for r in RESOURCES]
        if self.population == "tiers":
            texts += [
                t
                for spec in _parse_tier_specs(self.tiers)
                for r, t in spec.amounts.items()
                if r in RESOURCES
            ]
        return any(_parse_fraction(t) is not None for t in texts if t.strip())


@dataclass(frozen=True)
class _TierSpec:
    name: str
    share: Fraction
    amounts: dict[str, str]  # resource -> the tier's own text (only the keys it sets)


def _parse_tier_specs(items: Sequence[str]) -> list[_TierSpec]:
    """Parse and validate the ``devices.tiers`` strings; every error names ``devices.tiers``."""
    if not items:
        raise ConfigError(
            "devices.tiers: population = 'tiers' needs at least one tier, e.g. "
            '["small share=0.5 memory=0.25x", "large share=0.5 memory=1x"]'
        )
    specs: list[_TierSpec] = []
    for i, item in enumerate(items):
        key = f"devices.tiers[{i}]"
        words = item.split()
        if not words or "=" in words[0]:
            raise ConfigError(f"{key}: {item!r} must start with the tier's name")
        name, pairs = words[0], words[1:]
        if any(spec.name == name for spec in specs):
            raise ConfigError(f"{key}: duplicate tier name {name!r}")
        values: dict[str, str] = {}
        for pair in pairs:
            k, sep, v = pair.partition("=")
            if not sep or k not in ("share", *RESOURCES, *TRAITS):
                raise ConfigError(
                    f"{key}: {pair!r} in {item!r}: expected key=value with key one of "
                    f"share, {', '.join((*RESOURCES, *TRAITS))}"
                )
            if k in values:
                raise ConfigError(f"{key}: {k!r} given twice in {item!r}")
            values[k] = v
        if "share" not in values:
            raise ConfigError(f"{key}: tier {name!r} needs share=<fraction of the population>")
        try:
            share = Fraction(values.pop("share"))
        except (ValueError, ZeroDivisionError) as err:
            raise ConfigError(f"{key}: tier {name!r}: share is not a number ({err})") from err
        if not 0 < share <= 1:
            raise ConfigError(f"{key}: tier {name!r}: share must be in (0, 1], got {share}")
        for resource, text in values.items():
            try:
                if resource in TRAITS:
                    _trait(text, resource)
                else:
                    _check_amount(text, resource)
            except ValueError as err:
                raise ConfigError(f"{key}: tier {name!r}: {resource}: {err}") from err
        specs.append(_TierSpec(name, share, values))
    total = sum((spec.share for spec in specs), Fraction(0))
    if abs(total - 1) > SHARE_TOLERANCE:
        raise ConfigError(
            f"devices.tiers: shares sum to {float(total):.6g}, not 1 "
            f"({', '.join(f'{s.name}={float(s.share):g}' for s in specs)})"
        )
    return specs


# --------------------------------------------------------------------------- populations


@dataclass(frozen=True)
class Tier:
    """A share of the population with one budget."""

    name: str
    share: float
    budget: Budget


@dataclass(frozen=True)
class TierGroup:
    """Clients of one tier that share one budget: a row of the planner's per-tier table."""

    name: str
    budget: Budget
    client_ids: tuple[int, ...]


@dataclass(frozen=True)
class Population:
    """One budget and one tier name per client id (index = client id).

    Tier names: ``"all"`` for a homogeneous population; the tier's name for tiers; the trace's
    ``tier`` column, or ``"trace"`` when it has none. ``tiers``: the declared tiers, in the
    config's order (empty unless population = "tiers").
    """

    budgets: tuple[Budget, ...]
    tier_names: tuple[str, ...]
    tiers: tuple[Tier, ...] = ()

    def __post_init__(self) -> None:
        if len(self.budgets) != len(self.tier_names):
            raise ValueError("Population: one tier name per budget")

    def __len__(self) -> int:
        return len(self.budgets)

    def __getitem__(self, client_id: int) -> Budget:
        return self.budgets[client_id]

    def groups(self) -> list[TierGroup]:
        """Clients grouped by (tier name, budget): declared tiers in config order, then the rest
        in order of first appearance by client id.

        A tier (or a homogeneous population) is one group; a trace gives one group per distinct
        budget within each tier name. A declared tier that got no client has no group.
        """
        ids: dict[tuple[str, Budget], list[int]] = {}
        for cid, key in enumerate(zip(self.tier_names, self.budgets, strict=True)):
            ids.setdefault(key, []).append(cid)
        rank = {tier.name: i for i, tier in enumerate(self.tiers)}
        keys = sorted(ids, key=lambda k: rank.get(k[0], len(rank)))  # stable: ties keep order
        return [TierGroup(name, budget, tuple(ids[name, budget])) for name, budget in keys]


def resolve_tiers(cfg: DevicesConfig, reference: Reference | None) -> tuple[Tier, ...]:
    """The tiers of ``cfg`` with budgets in absolute units (table-level values fill unset keys)."""
    tiers = []
    for i, spec in enumerate(_parse_tier_specs(cfg.tiers)):
        amounts = {r: spec.amounts.get(r, getattr(cfg, r)) for r in RESOURCES}
        where = {
            r: f"devices.tiers[{i}] ({spec.name})" if r in spec.amounts else f"devices.{r}"
            for r in RESOURCES
        }
        traits = {r: spec.amounts.get(r, getattr(cfg, r)) for r in TRAITS}
        budget = Budget.of(
            [_resolve(amounts[r], r, reference, where[r]) for r in RESOURCES],
            **behaviour(traits),
        )
        tiers.append(Tier(spec.name, float(spec.share), budget))
    return tuple(tiers)


def tier_counts(shares: Sequence[float | Fraction], num_clients: int) -> list[int]:
    """Exact client counts per tier summing to ``num_clients`` (largest-remainder method).

    Quotas are ``share / sum(shares) * num_clients``; each tier gets the floor, and the leftover
    clients go to the largest remainders, ties to the earlier tier. Shares are taken as the
    decimals they print as, so 0.1 is exactly 1/10.
    """
    exact = [s if isinstance(s, Fraction) else Fraction(repr(float(s))) for s in shares]
    total = sum(exact, Fraction(0))
    quotas = [s / total * num_clients for s in exact]
    counts = [int(q) for q in quotas]  # floor: quotas are >= 0
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: num_clients - sum(counts)]:
        counts[i] += 1
    return counts


def _assign_tiers(counts: Sequence[int], seed: int) -> list[int]:
    """Tier index per client id: ``counts[t]`` clients each, ids drawn by a seeded permutation."""
    labels = np.repeat(np.arange(len(counts)), counts)
    perm = np.random.default_rng(np.random.SeedSequence([seed, _TIER_SALT])).permutation(
        len(labels)
    )
    out = np.empty(len(labels), dtype=np.int64)
    out[perm] = labels  # client perm[i] gets the i-th label
    return [int(t) for t in out]


def build_population(
    cfg: DevicesConfig,
    num_clients: int,
    reference: Reference | None,
    seed: int,
    base_dir: str | Path | None = None,
) -> Population:
    """One budget (and tier name) per client id ``0 .. num_clients - 1``.

    ``reference`` resolves fractions (``"0.25x"``); it may be ``None`` when none are used.
    ``seed`` (the run seed) decides which ids fall in which tier; counts are exact.
    ``base_dir``: a relative trace path is read from there (the config file's folder), else from
    the working directory. Errors are ``ConfigError`` naming the key or ``file:line``.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if cfg.population == "homogeneous":
        budget = Budget.of(
            [_resolve(getattr(cfg, r), r, reference, f"devices.{r}") for r in RESOURCES],
            **behaviour({r: getattr(cfg, r) for r in TRAITS}),
        )
        return Population((budget,) * num_clients, ("all",) * num_clients)
    if cfg.population == "tiers":
        tiers = resolve_tiers(cfg, reference)
        assignment = _assign_tiers(tier_counts([t.share for t in tiers], num_clients), seed)
        return Population(
            tuple(tiers[t].budget for t in assignment),
            tuple(tiers[t].name for t in assignment),
            tiers,
        )
    path = Path(cfg.trace)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    traced = read_trace(path, num_clients, reference)
    traits = behaviour({r: getattr(cfg, r) for r in TRAITS})  # the table's, for every device
    return Population(
        tuple(replace(b, **traits) for b in traced.budgets), traced.tier_names, traced.tiers
    )


_TRACE_REQUIRED = ("client_id", "memory", "flops", "upload")
_TRACE_OPTIONAL = ("download", "tier")


def read_trace(path: str | Path, num_clients: int, reference: Reference | None) -> Population:
    """Read a CSV of per-device budgets; its rows must cover client ids 0..num_clients-1 exactly.

    Columns ``client_id,memory,flops,upload`` and optionally ``download`` and ``tier``, in any
    order; cells take units (``48MB``) or fractions (``0.25x``); an empty cell is unlimited.
    Unknown columns are an error (nothing is ignored). Errors name ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"devices.trace: {str(path)!r} does not exist")
    rows: dict[int, tuple[Budget, str, int]] = {}
    extra: list[int] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [c for c in _TRACE_REQUIRED if c not in header]
        unknown = [c for c in header if c not in _TRACE_REQUIRED + _TRACE_OPTIONAL]
        if missing or unknown:
            raise ConfigError(
                f"{path}:1: header {','.join(header)!r}: "
                + (f"missing columns {missing}; " if missing else "")
                + (f"unknown columns {unknown}; " if unknown else "")
                + f"expected {','.join(_TRACE_REQUIRED)}[,download][,tier]"
            )
        for row in reader:
            line = reader.line_num
            where = f"{path}:{line}"
            if None in row:
                raise ConfigError(f"{where}: more cells than the {len(header)} columns")
            if any(row[c] is None for c in header):
                raise ConfigError(f"{where}: fewer cells than the {len(header)} columns")
            cid_text = row["client_id"].strip()
            if not re.fullmatch(r"[0-9]+", cid_text):
                raise ConfigError(f"{where}: client_id {cid_text!r} is not a non-negative integer")
            cid = int(cid_text)
            if cid in rows:
                raise ConfigError(f"{where}: client_id {cid} already given on line {rows[cid][2]}")
            if cid >= num_clients:
                extra.append(cid)
            budget = Budget.of(
                [
                    _resolve(row.get(r) or "", r, reference, f"{where}: column {r!r}")
                    for r in RESOURCES
                ]
            )
            rows[cid] = (budget, (row.get("tier") or "").strip() or "trace", line)
    absent = [c for c in range(num_clients) if c not in rows]
    if absent or extra:
        raise ConfigError(
            f"devices.trace: {path} must give client ids 0..{num_clients - 1} exactly: "
            + "; ".join(
                part
                for part in (
                    f"missing ids {_ranges(absent)}" if absent else "",
                    f"extra ids {_ranges(extra)} (data.num_clients = {num_clients})"
                    if extra
                    else "",
                )
                if part
            )
        )
    return Population(
        tuple(rows[c][0] for c in range(num_clients)), tuple(rows[c][1] for c in range(num_clients))
    )


def _ranges(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"`` (ids in errors, short even when many)."""
    spans: list[list[int]] = []
    for i in sorted(ids):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
