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
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ROOT, fill_sizes, log, read_figures, run_and_read
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from fedfit.config import Config, load_config
from fedfit.engine.runfolder import RunFolder
from fedfit.units import format_bytes, format_flops

RUNS = ROOT / "runs" / "bench"
# FEDFIT_BENCH_REFRESH=1: finished cells whose run folder still exists are re-read from it.
REFRESH = os.environ.get("FEDFIT_BENCH_REFRESH") == "1"


@dataclass
class Cell:
    """One run: ``key`` names it in the ledger; ``overrides`` are --set strings applied on top
    of the benchmark's base config."""

    key: str
    method: str
    overrides: list[str]
    info: dict[str, Any] = field(default_factory=dict)


class Ledger:
    """The result JSON, rewritten after every finished cell. ``header["base"]`` (the --set
    strings every cell shares) decides whether a file's finished cells still apply."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {"cells": {}}
        # the file's result rows as they were (figures read from run folders that a fresh
        # checkout lacks are taken from here)
        self.earlier_rows: list[dict[str, Any]] = []
        if path.exists():
            # Finished cells carry over only from a ledger of the same setting; anything else
            # in the file (an older benchmark's result) is rebuilt from the cells.
            old = json.loads(path.read_text())
            if old.get("base") == header.get("base"):
                self.data["cells"] = old.get("cells", {})
                self.earlier_rows = list(old.get("rows", []))
        self.data.update(header)
        self.data["command"] = "python " + shlex.join(
            [str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]
        )

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]  # type: ignore[no-any-return]

    def refresh(self) -> None:
        """Take in the cells that another process of the same benchmark finished since (two
        processes may share one ledger, each on other cells)."""
        if not self.path.exists():
            return
        old = json.loads(self.path.read_text())
        if old.get("base") == self.data.get("base"):
            for key, cell in old.get("cells", {}).items():
                self.cells.setdefault(key, cell)

    def save(self) -> None:
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            self.refresh()
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
        done = ledger.cells[cell.key]
        run_dir = Path(done["run_dir"])
        if REFRESH and RunFolder(run_dir).has_summary():
            # figures re-read from the run folder (after a change in what is read)
            done.update(read_figures(run_dir))
        return done
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


def sweep(
    run_point: Callable[[float, float | None], dict[str, Any]],
    lrs: Sequence[float],
    eps_values: Sequence[float | None],
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """A two-stage sweep: every lr at the first eps, then the other eps values at the best
    lr (ZO is far more sensitive to lr than to eps in float32, so this finds the same winner
    as the full grid in len(lrs) + len(eps) - 1 runs). Returns (points, winner)."""
    points = [run_point(lr, eps_values[0]) for lr in lrs]
    best = pick(points)
    if best is not None:
        points += [run_point(best["lr"], eps) for eps in eps_values[1:]]
    return points, pick(points)


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


def learned(row: dict[str, Any]) -> bool:
    """The issue's bar: at least 3 points above its own round 0, and an eval loss below the
    class-prior cross-entropy (below it, the model uses the text, not just the class
    frequencies)."""
    gain = row["final_accuracy"] - row["start_accuracy"]
    return bool(gain >= 0.03 and row["final_loss"] < row["prior_loss"])


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
    """The long runs: start, end, gain and what they cost."""
    lines = [
        "| method | lr | eps | round 0 | final | best | gain | eval loss (prior) | sequential "
        "steps | client FLOPs | upload | peak memory | learned |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gain = r["final_accuracy"] - r["start_accuracy"]
        eps = "-" if r.get("eps") is None else f"{r['eps']:g}"
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {eps} | {pct(r['start_accuracy'])} | "
            f"{pct(r['final_accuracy'])} | {pct(r['best_accuracy'])} | {100 * gain:+.1f} | "
            f"{num(r['final_loss'])} ({num(r['prior_loss'])}) | {r['sequential_steps']} | "
            f"{format_flops(r['cum_client_flops'])} | {format_bytes(r['cum_upload_bytes'])} | "
            f"{format_bytes(r['peak_memory_bytes_max'])} | {'yes' if learned(r) else 'no'} |"
        )
    return lines


def sweep_table(points: list[dict[str, Any]]) -> list[str]:
    """Every sweep point's final eval loss and accuracy, the chosen one starred."""
    lines = ["Sweep (final eval loss after the sweep rounds; * = chosen):", ""]
    lines += ["| method | lr | eps | eval loss | accuracy |", "|---|---|---|---|---|"]
    for p in points:
        mark = "*" if p.get("chosen") else ""
        eps = "-" if p.get("eps") is None else f"{p['eps']:g}"
        lines.append(
            f"| {p['method']}{mark} | {p['lr']:g} | {eps} | {num(p['final_loss'])} | "
            f"{pct(p['final_accuracy'])} |"
        )
    return lines


def plot_curves(result: dict[str, Any]) -> Figure:
    """Accuracy against rounds (from round 0) and against cumulative client FLOPs."""
    fig = Figure(figsize=(11, 4))
    by_round, by_flops = fig.subplots(1, 2)
    for r in result["rows"]:
        ys = [p["accuracy"] for p in r["curve"]]
        by_round.plot([p["round"] for p in r["curve"]], ys, marker=".", label=r["method"])
        by_flops.plot([max(p["client_flops"], 1) for p in r["curve"]], ys, marker=".")
    by_round.set(xlabel="round (0 = the start)", ylabel="held-out accuracy")
    by_flops.set(xlabel="cumulative client FLOPs (round 0 included)", xscale="log")
    by_flops.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlap
    by_round.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_result(
    ledger: Ledger,
    out: Path,
    result: dict[str, Any],
    claims: Callable[[list[dict[str, Any]]], list[str]],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """The ledger JSON with the result's rows, sweep, claims and notes; ``out``.md and .png."""
    result.update(command=ledger.data["command"], setting=ledger.data["setting"])
    result["claims"] = claims(result["rows"])
    ledger.data.update(result)
    ledger.save()
    out.with_suffix(".md").write_text(markdown(result))
    if result["rows"]:
        plot_curves(result).savefig(out.with_suffix(".png"), dpi=110)


def sweep_then_long(
    method: str,
    run_point: Callable[[Cell], dict[str, Any]],
    grid: tuple[Sequence[float], Sequence[float | None]],
    make_cell: Callable[[str, float, float | None, str], Cell],
    local_steps: int,
    result: dict[str, Any],
    write: Callable[[], None],
) -> None:
    """One method's sweep (``make_cell(method, lr, eps, "sweep")``), then its long run at the
    winner (``"long"``), both added to ``result`` and written as soon as each is known, so a
    stopped benchmark keeps whole rows."""
    points, best = sweep(
        lambda lr, eps: run_point(make_cell(method, lr, eps, "sweep")), grid[0], grid[1]
    )
    if best is None:
        result["notes"].append(f"{method}: every sweep point diverged (NaN loss)")
        return
    result["sweep"] += [{**q, "chosen": q is best} for q in points]
    if at_edge(best["lr"], grid[0]):
        result["notes"].append(f"{method}: chosen lr {best['lr']:g} is at the grid's edge")
    write()
    row = run_point(make_cell(method, best["lr"], best["eps"], "long"))
    row["sequential_steps"] = row["rounds"] * local_steps
    result["rows"].append(row)
    write()


# ---------------------------------------------------------------- a sweep-then-long benchmark

STARTS = {
    # --start: (the title's words, the setting's words)
    "ncm": ("a class-mean head", "class-mean head start (10 clients)"),
    "random": ("a random head", "random head"),
}


def start_overrides(start: str, quick: bool) -> list[str]:
    """The model's head before round 1: federated class means (round 0 from 10 clients, 4 in
    a quick run) or the model's random head."""
    if start == "ncm":
        return ["model.head_init=ncm", f"model.head_init_clients={4 if quick else 10}"]
    return ["model.head_init=random"]


def benchmark_args(
    argv: Sequence[str] | None,
    doc: str,
    sizes: tuple[dict[str, int], dict[str, int]],
    defaults: Mapping[str, Sequence[str]],
    start_help: str,
    choices: Sequence[str] | None = None,
) -> Any:
    """The command line shared by the gradient-free benchmarks: ``--quick``, one flag per
    size of ``sizes`` (FULL, QUICK: those left unset take the chosen set's value),
    ``--threads``, ``--methods`` (default ``defaults[start]``), ``--start``, ``--out``."""
    import argparse

    full, quick = sizes
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny-bert smoke test")
    for key in full:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--methods", nargs="+", default=None, choices=choices,
                   help=f"default: {' '.join(defaults['ncm'])}; with --start random: "
                   f"{' '.join(defaults['random'])}")  # fmt: skip
    p.add_argument("--start", choices=tuple(STARTS), default="ncm", help=start_help)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = list(defaults[args.start])
    fill_sizes(args, quick if args.quick else full)
    return args


def run_benchmark(
    base_name: str,
    args: Any,
    setting: str,
    common: list[str],
    grid: Callable[[str, str], tuple[Sequence[float], Sequence[float | None]]],
    make_cell: Callable[[str, float, float | None, str], Cell],
    claims: Callable[[list[dict[str, Any]]], list[str]],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Every method of ``args.methods``: its sweep, then its long run (``sweep_then_long``),
    the result written after each cell to ``RESULTS/NAME.json / .md / .png`` (NAME:
    ``base_name``, ``_random`` for a random start, ``-quick`` for a smoke test under /tmp)."""
    from common import DEFAULT_TOML, RESULTS

    name = base_name + ("" if args.start == "ncm" else "_random") + ("-quick" if args.quick else "")
    out = args.out or (Path("/tmp") / name if args.quick else RESULTS / name)
    header = {"setting": setting, "benchmark": name, "base": common}
    ledger = Ledger(out.with_suffix(".json"), header)
    result: dict[str, Any] = {"rows": [], "sweep": [], "claims": [], "notes": [],
                              "start": STARTS[args.start][0]}  # fmt: skip

    def write() -> None:
        write_result(ledger, out, result, claims, markdown)

    def run_point(c: Cell) -> dict[str, Any]:
        return run_cell(ledger, name, DEFAULT_TOML, common, c)

    for method in args.methods:
        sweep_then_long(
            method, run_point, grid(method, args.start), make_cell, args.local_steps, result, write
        )
    write()
    log(f"wrote {out.with_suffix('.md')} (run folders under {RUNS / name})")
