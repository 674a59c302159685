"""Long benchmarks in resumable cells: a sweep on a short budget, then the long runs.

A benchmark here is a list of *cells*, each one fedfit run (one method at one setting). The
result JSON is the ledger: a finished cell's figures are written into it as soon as the cell
ends, and a rerun of the same command skips every cell already there, so a benchmark of many
hours runs in pieces (a stopped process, a new session) and loses at most the cell it was in.
A cell's run folder (``runs/bench/<benchmark>/<cell>``) is resumed from its last round when it
still exists with the same config (fedfit's own ``--resume``), else started again.

Tuning is the same effort for every method: each point of its grid runs ``sweep_rounds`` rounds
and the point with the lowest final eval loss wins (not accuracy: early in a run accuracy
moves in steps of whole examples and hides which setting is learning). A winner at the edge of
its grid is flagged. The long run of each method then uses its winner.

Every figure is read from the run folder that fedfit wrote (``common.run_and_read``); a curve
starts at round 0, the model before training.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ROOT, log, run_and_read

from fedfit.config import Config, load_config

RUNS = ROOT / "runs" / "bench"


@dataclass
class Cell:
    """One run: ``key`` names it in the ledger; ``overrides`` are --set strings applied on top
    of the benchmark's base config."""

    key: str
    method: str
    overrides: list[str]
    info: dict[str, Any] = field(default_factory=dict)


class Ledger:
    """The result JSON, rewritten after every finished cell."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {"cells": {}}
        if path.exists():
            self.data = json.loads(path.read_text())
            self.data.setdefault("cells", {})
        self.data.update(header)
        self.data["command"] = "python " + shlex.join(
            [str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]
        )

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]  # type: ignore[no-any-return]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def run_cell(
    ledger: Ledger,
    benchmark: str,
    base: Path,
    common: Sequence[str],
    cell: Cell,
    after: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The cell's figures: from the ledger if it finished before, else run (or resume) it."""
    if cell.key in ledger.cells:
        return ledger.cells[cell.key]
    overrides = [
        *common,
        *cell.overrides,
        f"run.output_dir={RUNS / benchmark}",
        f"run.name={cell.key}",
    ]
    config: Config = load_config(base, overrides)
    log(f"[{benchmark}] {cell.key}: {' '.join(cell.overrides)}")
    t0 = time.perf_counter()
    figures = run_and_read(config, resume=True)
    figures.update(
        method=cell.method,
        key=cell.key,
        overrides=cell.overrides,
        **cell.info,
        cell_wall_s=round(time.perf_counter() - t0, 1),
    )
    ledger.cells[cell.key] = figures
    ledger.save()
    if after is not None:
        after()
    return figures


def pick(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The sweep point with the lowest final eval loss (a NaN loss never wins)."""
    finite = [p for p in points if math.isfinite(p.get("final_loss", math.nan))]
    return min(finite, key=lambda p: p["final_loss"]) if finite else None


def at_edge(value: float, grid: Sequence[float]) -> bool:
    """Whether a chosen value is the smallest or largest of a grid of more than one point."""
    return len(grid) > 1 and value in (min(grid), max(grid))


def sequential_steps(rounds: int, local_steps: int) -> int:
    """Client steps one after another in a run (rounds x local steps per round)."""
    return rounds * local_steps


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"
