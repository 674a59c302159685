"""Tables and plots from a run folder (``runs/<name>/``).

A run folder holds ``config.toml`` (the resolved config), ``rounds.jsonl`` (one object per round,
with an ``eval`` dict on evaluation rounds), ``clients.jsonl`` (one object per client update),
``summary.json`` (written at the end) and ``plots/`` (written here). This module only reads those
files: it never imports the engine, so a report can be drawn from a run copied off another machine,
and from a run still in progress (no ``summary.json`` yet: final/best come from ``rounds.jsonl``).

Units: sizes and compute use DECIMAL SI prefixes (1 MB = 1e6 bytes, 1 GFLOP = 1e9 FLOP), as
network bandwidth and FLOP counts are quoted, and are printed with three significant figures
(``format_bytes(1_500_000) == "1.50 MB"``, ``format_flops(67e9) == "67.0 GFLOP"``); both come
from ``fedfit.units`` and are re-exported here.

Plots use matplotlib's object API (``matplotlib.figure.Figure``, rendered by the Agg canvas), never
``pyplot``: no display is needed, no global figure registry leaks memory when many runs are
drawn, and each plotting function returns its Figure so tests can read back the plotted data.
matplotlib is imported only by the functions that plot, so tables and unit formatting stay light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfit.engine.runfolder import CONFIG, ROUNDS, RunFolder
from fedfit.units import (
    SI_PREFIXES,
    format_bytes,
    format_duration,
    format_flops,
    scale_si,
    three_sig_figs,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

__all__ = [
    "XAXES",
    "RunRecord",
    "compare_runs",
    "comparison_table",
    "eval_table",
    "format_bytes",
    "format_duration",
    "format_flops",
    "load_run",
    "metric_series",
    "plot_client_costs",
    "plot_metric",
    "plot_train_loss",
    "print_report",
    "summary_rows",
    "summary_table",
    "write_plots",
]

# The headline metric of each task; higher accuracy is better, lower perplexity is better.
METRIC_BY_TASK = {"classification": "accuracy", "lm": "perplexity"}
_HIGHER_IS_BETTER = {"accuracy": True, "perplexity": False, "loss": False}

_DPI = 150
# Readable at the size a PNG is shown in a README or a notebook.
_STYLE: dict[Any, Any] = {  # keys typed as Any: matplotlib stubs want Literal rc names
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 13,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
}


# --------------------------------------------------------------------------- human units


def _tick_formatter(unit: str, mantissas: frozenset[int] | None = None) -> FuncFormatter:
    """Compact tick labels for log axes: 1e7 -> "10 MB", 2e9 -> "2 GFLOP"; "" for <= 0.

    With ``mantissas``, only values m * 10**k with m in the set are labelled (minor ticks).
    An empty ``unit`` gives plain numbers ("300"), for a log perplexity axis.
    """

    from matplotlib.ticker import FuncFormatter

    def fmt(value: float, _pos: int | None = None) -> str:
        if value <= 0:
            return ""
        if mantissas is not None:
            m = value / 10 ** math.floor(math.log10(value))
            if round(m) not in mantissas or abs(m - round(m)) > 1e-6:
                return ""
        if not unit:
            return f"{value:g}"
        v, prefix = scale_si(value)
        return f"{float(f'{v:.3g}'):g} {prefix}{unit}"

    return FuncFormatter(fmt)


def _format_metric(metric: str, value: Any) -> str:
    if not isinstance(value, int | float):
        return "n/a"
    if metric == "accuracy":
        return f"{value:.2%}"
    return f"{value:.3f}" if metric == "loss" else f"{value:.2f}"


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class RunRecord:
    """The parsed contents of one run folder (see the module docstring for the file formats)."""

    path: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    summary: dict[str, Any]

    def _config_name(self, table: str) -> str | None:
        section = self.config.get(table)
        if isinstance(section, dict) and isinstance(section.get("name"), str):
            return section["name"]
        return None

    @property
    def name(self) -> str:
        """summary.json's name, else config [run] name, else the folder name."""
        return str(self.summary.get("name") or self._config_name("run") or self.path.name)

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self._config_name("method") or "?")

    @property
    def model(self) -> str:
        return str(self.summary.get("model") or self._config_name("model") or "?")

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset") or self._config_name("data") or "?")

    @property
    def task(self) -> str:
        """ "classification" or "lm" from summary.json, else inferred from the eval keys."""
        task = self.summary.get("task")
        if isinstance(task, str):
            return task
        evals = [r["eval"] for r in self.eval_rounds]
        if any("perplexity" in e for e in evals):
            return "lm"
        if any("accuracy" in e for e in evals):
            return "classification"
        return "unknown"

    @property
    def metric(self) -> str:
        """The headline metric: accuracy (classification), perplexity (LM), else eval loss."""
        return METRIC_BY_TASK.get(self.task, "loss")

    @property
    def eval_rounds(self) -> list[dict[str, Any]]:
        """The rounds that carry an ``eval`` dict, in file order."""
        return [r for r in self.rounds if isinstance(r.get("eval"), dict)]

    @property
    def majority_baseline(self) -> float | None:
        value = self.summary.get("majority_baseline")
        return float(value) if isinstance(value, int | float) else None

    @property
    def label(self) -> str:
        """Legend label: "name (method)"."""
        return f"{self.name} ({self.method})"

    @property
    def title(self) -> str:
        return f"{self.name}\n{self.method} · {self.model} · {self.dataset}"


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder.

    ``config.toml`` and ``rounds.jsonl`` are required (the engine writes them first);
    ``clients.jsonl`` and ``summary.json`` are optional so a run still in progress can be reported.
    Raises FileNotFoundError naming the missing folder/file and ValueError naming ``file:line`` of
    a corrupt JSONL line (or the file of a corrupt TOML/JSON document).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder not found: {root}")
    folder = RunFolder(root)
    for required in (CONFIG, ROUNDS):
        if not folder.file(required).is_file():
            raise FileNotFoundError(f"{folder.file(required)}: missing from run folder {root}")
    config = folder.config_table()
    rounds = folder.rounds()
    # Wall times live in timing.jsonl so that rounds.jsonl stays deterministic; join them.
    wall = {t["round"]: t["wall_s"] for t in folder.timing() if "wall_s" in t}
    rounds = [dict(r, wall_s=wall[r["round"]]) if r.get("round") in wall else r for r in rounds]
    summary = folder.summary() if folder.has_summary() else {}
    clients = folder.clients()
    return RunRecord(path=root, config=config, rounds=rounds, clients=clients, summary=summary)


# --------------------------------------------------------------------------- derived numbers


def _final_eval(run: RunRecord) -> dict[str, Any]:
    final = run.summary.get("final")
    if isinstance(final, dict) and final:
        return final
    evals = run.eval_rounds
    return {**evals[-1]["eval"], "round": evals[-1].get("round")} if evals else {}


def _best_eval(run: RunRecord) -> dict[str, Any]:
    best = run.summary.get("best")
    if isinstance(best, dict) and best:
        return best
    metric = run.metric
    scored = [r for r in run.eval_rounds if isinstance(r["eval"].get(metric), int | float)]
    if not scored:
        return {}
    sign = 1 if _HIGHER_IS_BETTER.get(metric, False) else -1
    top = max(scored, key=lambda r: sign * r["eval"][metric])
    return {**top["eval"], "round": top.get("round")}


def _total(run: RunRecord, key: str) -> float | None:
    """Cumulative total of a per-round cost: the last ``cum_<key>``, else the sum of ``<key>``."""
    for r in reversed(run.rounds):
        if isinstance(r.get(f"cum_{key}"), int | float):
            return float(r[f"cum_{key}"])
    values = [r[key] for r in run.rounds if isinstance(r.get(key), int | float)]
    return float(sum(values)) if values else None


def _client_values(run: RunRecord, key: str) -> list[float]:
    """One value per client update; peak memory falls back to ``memory.peak_bytes``."""
    out: list[float] = []
    for c in run.clients:
        value = c.get(key)
        if value is None and key == "peak_memory_bytes" and isinstance(c.get("memory"), dict):
            value = c["memory"].get("peak_bytes")
        if isinstance(value, int | float):
            out.append(float(value))
    return out


def _per_client(run: RunRecord) -> dict[str, float | None]:
    """Per-client costs from summary.json, else computed from clients.jsonl."""
    summary = run.summary.get("per_client")
    summary = summary if isinstance(summary, dict) else {}
    out: dict[str, float | None] = {}
    for key, source, reduce in (
        ("peak_memory_bytes_max", "peak_memory_bytes", max),
        ("flops_mean", "flops", lambda v: sum(v) / len(v)),
        ("upload_bytes_mean", "upload_bytes", lambda v: sum(v) / len(v)),
        ("download_bytes_mean", "download_bytes", lambda v: sum(v) / len(v)),
    ):
        if isinstance(summary.get(key), int | float):
            out[key] = float(summary[key])
        else:
            values = _client_values(run, source)
            out[key] = float(reduce(values)) if values else None
    return out


def _excluded(run: RunRecord) -> str:
    value = run.summary.get("excluded_clients")
    if isinstance(value, bool) or value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return str(len(value)) if isinstance(value, list | dict) else str(value)


def summary_rows(run: RunRecord) -> list[tuple[str, str]]:
    """The (quantity, value) rows of :func:`summary_table`, already formatted (pure; tested)."""
    metric = run.metric
    final, best = _final_eval(run), _best_eval(run)
    per = _per_client(run)
    rounds = run.summary.get("rounds_completed", len(run.rounds))
    wall = run.summary.get("wall_s")
    if not isinstance(wall, int | float) and run.rounds:
        wall = run.rounds[-1].get("wall_s")

    def at_round(d: dict[str, Any]) -> str:
        return f" (round {d['round']})" if d.get("round") is not None else ""

    rows = [
        ("task", run.task),
        ("rounds completed", str(rounds)),
        (f"final {metric}", _format_metric(metric, final.get(metric)) + at_round(final)),
        (f"best {metric}", _format_metric(metric, best.get(metric)) + at_round(best)),
        ("final eval loss", _format_metric("loss", final.get("loss"))),
    ]
    if metric == "accuracy":
        rows.append(("majority baseline", _format_metric("accuracy", run.majority_baseline)))
    rows += [
        ("wall time", format_duration(wall if isinstance(wall, int | float) else None)),
        ("total upload (all clients)", format_bytes(_total(run, "upload_bytes"))),
        ("total download (all clients)", format_bytes(_total(run, "download_bytes"))),
        ("total client compute", format_flops(_total(run, "client_flops"))),
        ("per client: peak memory (max)", format_bytes(per["peak_memory_bytes_max"])),
        ("per client: FLOPs per round (mean)", format_flops(per["flops_mean"])),
        ("per client: upload per round (mean)", format_bytes(per["upload_bytes_mean"])),
        ("per client: download per round (mean)", format_bytes(per["download_bytes_mean"])),
        ("excluded clients", _excluded(run)),
    ]
    return rows


def summary_table(run: RunRecord) -> Table:
    """Rich table of a run's outcome and costs (human units, decimal prefixes)."""
    # Names and paths are data, not rich markup: "[...]" in them must print as is.
    table = Table(
        title=escape(f"run {run.name}"),
        caption=escape(f"{run.method} · {run.model} · {run.dataset}"),
    )
    table.add_column("quantity", style="bold")
    table.add_column("value", justify="right")
    for key, value in summary_rows(run):
        table.add_row(escape(key), escape(value))
    return table


def _evenly(items: list[Any], limit: int) -> list[Any]:
    """At most ``limit`` items spread evenly, always keeping the first and the last."""
    if len(items) <= limit:
        return items
    idx = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in idx]


def eval_table(run: RunRecord, max_rows: int = 20) -> Table:
    """Compact per-round table of the evaluation rounds (at most ``max_rows``, evenly spaced)."""
    metric = run.metric
    evals = run.eval_rounds
    shown = _evenly(evals, max_rows)
    caption = f"{len(shown)} of {len(evals)} eval rounds" if len(shown) < len(evals) else None
    table = Table(title="evaluation rounds", caption=caption)
    # no_wrap: a number split over two lines is unreadable; two-line headers keep columns narrow.
    for col in (
        "round",
        "wall",
        "upload\n(cum)",
        "client\nFLOPs (cum)",
        "train\nloss",
        "eval\nloss",
    ):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column(metric, justify="right", style="bold", no_wrap=True)
    for r in shown:
        e = r["eval"]
        table.add_row(
            str(r.get("round", "?")),
            format_duration(r.get("wall_s")),
            format_bytes(r.get("cum_upload_bytes")),
            format_flops(r.get("cum_client_flops")),
            _format_metric("loss", r.get("train_loss")),
            _format_metric("loss", e.get("loss")),
            _format_metric(metric, e.get(metric)),
        )
    return table


# --------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class XAxis:
    """One x-axis of the metric plots: which ``rounds.jsonl`` key, its label and scale."""

    key: str
    label: str  # axis label, with its unit
    short: str  # for figure titles
    log: bool
    unit: str  # human-unit tick labels on log axes ("B", "FLOP")


XAXES: dict[str, XAxis] = {
    "round": XAxis("round", "round", "round", log=False, unit=""),
    "upload": XAxis(
        "cum_upload_bytes", "cumulative upload, all clients (bytes)", "upload", True, "B"
    ),
    "flops": XAxis(
        "cum_client_flops", "cumulative client compute (FLOP)", "client compute", True, "FLOP"
    ),
    "wall": XAxis("wall_s", "wall time", "wall time", log=False, unit=""),
}


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    # Tick labels are created at draw time, so saving must happen inside the same context.
    with matplotlib.rc_context(_STYLE):
        yield


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _style():
        fig.savefig(path, dpi=_DPI)  # constrained layout already fits the labels
    return path


def metric_series(
    run: RunRecord, x: str = "round", metric: str | None = None
) -> tuple[list[float], list[float]]:
    """(x values, metric values) of the evaluation rounds; ``x`` is a key of :data:`XAXES`.

    Rounds lacking the metric or the x value are skipped; on log axes non-positive x (e.g. an
    evaluation before any upload) is dropped because it has no place on a log scale.
    """
    axis = XAXES[x]
    metric = metric or run.metric
    xs: list[float] = []
    ys: list[float] = []
    for r in run.eval_rounds:
        xv, yv = r.get(axis.key), r["eval"].get(metric)
        if not isinstance(xv, int | float) or not isinstance(yv, int | float):
            continue
        if axis.log and xv <= 0:
            continue
        xs.append(float(xv))
        ys.append(float(yv))
    return xs, ys


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds >= 2 * 3600:
        return 3600.0, "h"
    if max_seconds >= 120:
        return 60.0, "min"
    return 1.0, "s"


def _log_ticks(axis: Axis, unit: str, values: list[float]) -> None:
    """Human tick labels on a log axis; label some minor ticks when the data spans few decades.

    Over fewer than two decades there are only one or two major (power-of-ten) ticks, too few to
    read a value off, so 2x and 5x (and 3x under 1.5 decades) minor ticks get labels too.
    """
    axis.set_major_formatter(_tick_formatter(unit))
    ratio = max(values) / min(values) if values else math.inf
    keep = frozenset({2, 3, 5}) if ratio < 30 else frozenset({2, 5}) if ratio < 100 else frozenset()
    axis.set_minor_formatter(_tick_formatter(unit, keep))


def _format_x_axis(ax: Axes, axis: XAxis, xs: list[float]) -> None:
    from matplotlib.ticker import MaxNLocator

    if axis.log and xs:
        ax.set_xscale("log")
        _log_ticks(ax.xaxis, axis.unit, xs)
    if axis.key == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _format_y_axis(ax: Axes, metric: str, ys: list[float]) -> None:
    from matplotlib.ticker import PercentFormatter

    if metric == "accuracy":
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.set_ylabel("accuracy (%)")
    elif metric == "perplexity":
        if ys and min(ys) > 0 and max(ys) / min(ys) > 10:
            ax.set_yscale("log")  # perplexity falls by orders of magnitude early in training
            _log_ticks(ax.yaxis, "", ys)
        ax.set_ylabel("perplexity (lower is better)")
    else:
        ax.set_ylabel(f"eval {metric}")


def plot_metric(runs: RunRecord | Sequence[RunRecord], x: str = "round") -> Figure:
    """Headline metric (accuracy or perplexity) of one or more runs against ``x`` (see XAXES).

    One line per run with a marker on every evaluation point; the majority-class baseline as a
    dashed line for classification. Raises ValueError if the runs' metrics differ.
    """
    from matplotlib.figure import Figure

    runs = [runs] if isinstance(runs, RunRecord) else list(runs)
    if not runs:
        raise ValueError("plot_metric needs at least one run")
    _check_same_metric(runs)
    metric, axis = runs[0].metric, XAXES[x]
    with _style():
        fig = Figure(figsize=(7.0, 4.5), layout="constrained")
        ax = fig.add_subplot()
        all_x: list[float] = []
        all_y: list[float] = []
        scale, unit = 1.0, ""
        if x == "wall":
            wall = [r.get("wall_s") for run in runs for r in run.rounds]
            scale, unit = _time_unit(max([w for w in wall if isinstance(w, int | float)] or [0.0]))
        for run in runs:
            xs, ys = metric_series(run, x)
            xs = [v / scale for v in xs]
            all_x += xs
            all_y += ys
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.6, label=run.label)
        if metric == "accuracy":
            baselines = {run.majority_baseline for run in runs} - {None}
            for b in sorted(b for b in baselines if b is not None):
                label = f"majority baseline ({b:.1%})"
                ax.axhline(b, linestyle="--", color="0.4", linewidth=1.2, label=label)
        _format_x_axis(ax, axis, all_x)
        _format_y_axis(ax, metric, all_y)
        ax.set_xlabel(f"{axis.label} ({unit})" if unit else axis.label)
        if len(runs) == 1:
            ax.set_title(runs[0].title)
        else:
            shared = {f"{run.model} · {run.dataset}" for run in runs}
            where = f"\n{shared.pop()}" if len(shared) == 1 else ""
            ax.set_title(f"{metric} vs {axis.short}: {len(runs)} runs{where}")
        if not all_x:
            ax.text(0.5, 0.5, "no evaluation rounds", transform=ax.transAxes, ha="center")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    return fig


def plot_train_loss(run: RunRecord) -> Figure:
    """Mean client training loss per round (every round, not only evaluation rounds)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    pts = [
        (float(r["round"]), float(r["train_loss"]))
        for r in run.rounds
        if isinstance(r.get("round"), int | float) and isinstance(r.get("train_loss"), int | float)
    ]
    with _style():
        fig = Figure(figsize=(7.0, 4.5), layout="constrained")
        ax = fig.add_subplot()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1.4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("train loss (client mean)")
        ax.set_title(run.title)
    return fig


def _unit_for(values: list[float], unit: str) -> tuple[float, str]:
    """Divisor and prefixed unit that suit the largest value (e.g. 1e9, "GFLOP")."""
    _, prefix = scale_si(max(values) if values else 0.0)
    return 1000.0 ** SI_PREFIXES.index(prefix), f"{prefix}{unit}"


def plot_client_costs(run: RunRecord) -> Figure:
    """Distribution over client updates of peak memory (MB), FLOPs, upload and download bytes.

    One histogram per cost, each value one client in one round; the dashed line is the mean,
    and each panel's title gives the mean and the maximum.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels: list[tuple[str, str, Callable[[list[float]], tuple[float, str]]]] = [
        ("peak_memory_bytes", "peak memory", lambda v: (1e6, "MB")),
        ("flops", "compute per round", lambda v: _unit_for(v, "FLOP")),
        ("upload_bytes", "upload per round", lambda v: _unit_for(v, "B")),
        ("download_bytes", "download per round", lambda v: _unit_for(v, "B")),
    ]
    with _style():
        fig = Figure(figsize=(9.0, 6.5), layout="constrained")
        axes = fig.subplots(2, 2)
        for ax, (key, label, unit_of) in zip(axes.flat, panels, strict=True):
            values = _client_values(run, key)
            div, unit = unit_of(values)
            scaled = [v / div for v in values]
            if scaled:
                lo, hi = min(scaled), max(scaled)
                # Equal costs (common: every client uploads the same adapter) would get numpy's
                # default +-0.5 range; +-5% around the value shows one bar centred on it.
                span = (
                    (lo - 0.05 * abs(lo) - 1e-9, hi + 0.05 * abs(hi) + 1e-9) if lo == hi else None
                )
                bins = 2 * min(15, max(2, math.ceil(math.sqrt(len(scaled)) / 2))) + 1  # odd
                ax.hist(scaled, bins=bins, range=span, color="C0", alpha=0.8, edgecolor="white")
                mean = sum(scaled) / len(scaled)
                ax.axvline(mean, color="C3", linestyle="--", linewidth=1.5)
                ax.set_title(
                    f"mean {three_sig_figs(mean)} {unit}, max {three_sig_figs(hi)} {unit}",
                    fontsize=10,
                )
                ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
            else:
                ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center")
            ax.set_xlabel(f"{label} ({unit})")
            ax.set_ylabel("client updates")
        fig.suptitle(f"per-client costs ({len(run.clients)} client updates): {run.title}")
    return fig


def write_plots(run: RunRecord, out_dir: Path | None = None) -> list[Path]:
    """Draw a run's figures as 150-dpi PNGs into ``out_dir`` (default ``<run>/plots``).

    Writes ``<metric>_vs_round``, ``<metric>_vs_upload`` (log x), ``<metric>_vs_flops`` (log x),
    ``train_loss`` and, if clients.jsonl has rows, ``client_costs``. Returns the paths written.
    """
    out = Path(out_dir) if out_dir is not None else run.path / "plots"
    metric = run.metric
    paths = [
        _save(plot_metric(run, x), out / f"{metric}_vs_{x}.png")
        for x in ("round", "upload", "flops")
    ]
    paths.append(_save(plot_train_loss(run), out / "train_loss.png"))
    if run.clients:
        paths.append(_save(plot_client_costs(run), out / "client_costs.png"))
    return paths


def print_report(path: str | Path, console: Console | None = None) -> None:
    """Print a run's summary and evaluation tables, then (re)draw its plots and list them."""
    console = console or Console()
    run = load_run(path)
    console.print(summary_table(run))
    if run.eval_rounds:
        console.print(eval_table(run))
    for p in write_plots(run):
        console.print(f"wrote {p}", markup=False, highlight=False)


# --------------------------------------------------------------------------- comparison


def _check_same_metric(runs: Sequence[RunRecord]) -> None:
    metrics = {run.metric for run in runs}
    if len(metrics) > 1:
        named = ", ".join(f"{run.name} ({run.task}: {run.metric})" for run in runs)
        raise ValueError(f"cannot compare runs with different tasks/metrics: {named}")


def comparison_table(runs: Sequence[RunRecord]) -> Table:
    """One column per run, one row per quantity: final/best metric, bytes, FLOPs, peak memory.

    Runs are columns (not rows) so that the handful of runs one overlays in a figure fits an
    80-column terminal; model and dataset rows appear only where the runs differ.
    """
    _check_same_metric(runs)
    metric = runs[0].metric if runs else "metric"
    models, datasets = {r.model for r in runs}, {r.dataset for r in runs}
    shared = [f"model {next(iter(models))}"] if len(models) == 1 else []
    shared += [f"dataset {next(iter(datasets))}"] if len(datasets) == 1 else []
    table = Table(title=f"comparison ({metric})", caption=escape(", ".join(shared)) or None)
    table.add_column("quantity", style="bold")
    for run in runs:
        table.add_column(escape(run.label), justify="right", no_wrap=True)

    def wall(run: RunRecord) -> str:
        w = run.summary.get("wall_s") or (run.rounds[-1].get("wall_s") if run.rounds else None)
        return format_duration(w if isinstance(w, int | float) else None)

    rows: list[tuple[str, Callable[[RunRecord], str]]] = []
    if len(models) > 1:
        rows.append(("model", lambda r: r.model))
    if len(datasets) > 1:
        rows.append(("dataset", lambda r: r.dataset))
    rows += [
        ("rounds", lambda r: str(r.summary.get("rounds_completed", len(r.rounds)))),
        (f"final {metric}", lambda r: _format_metric(metric, _final_eval(r).get(metric))),
        (f"best {metric}", lambda r: _format_metric(metric, _best_eval(r).get(metric))),
        ("total upload", lambda r: format_bytes(_total(r, "upload_bytes"))),
        ("total download", lambda r: format_bytes(_total(r, "download_bytes"))),
        ("total client compute", lambda r: format_flops(_total(r, "client_flops"))),
        (
            "client peak memory (max)",
            lambda r: format_bytes(_per_client(r)["peak_memory_bytes_max"]),
        ),
        ("wall time", wall),
    ]
    for name, cell in rows:
        table.add_row(name, *(escape(cell(run)) for run in runs))
    return table


def compare_runs(
    paths: Sequence[str | Path], out: Path, console: Console | None = None
) -> list[Path]:
    """Overlay several runs: one figure per x-axis (round, upload, FLOPs, wall time) in ``out``.

    Prints a comparison table. Raises ValueError (naming the runs) when their tasks differ, since
    accuracy and perplexity cannot share an axis.
    """
    if not paths:
        raise ValueError("compare_runs needs at least one run folder")
    runs = [load_run(p) for p in paths]
    _check_same_metric(runs)
    runs = _unique_labels(runs)
    console = console or Console()
    console.print(comparison_table(runs))
    out = Path(out)
    metric = runs[0].metric
    written = [_save(plot_metric(runs, x), out / f"compare_{metric}_vs_{x}.png") for x in XAXES]
    for p in written:
        console.print(f"wrote {p}", markup=False, highlight=False)
    return written


def _unique_labels(runs: list[RunRecord]) -> list[RunRecord]:
    """Name runs that share a name by their folder ("parent/folder"), so legend entries differ."""
    names = [run.name for run in runs]
    out = []
    for run in runs:
        if names.count(run.name) > 1:
            summary = {**run.summary, "name": f"{run.path.parent.name}/{run.path.name}"}
            run = RunRecord(run.path, run.config, run.rounds, run.clients, summary)
        out.append(run)
    return out
