"""What the run-based benchmarks share: run one config through the engine with progress on
stderr, read back its accuracy curve and per-client costs, and write a result's
.json / .md / .png side by side.

Scripts under benchmarks/ import it as ``common`` (Python puts the script's folder first on
the path).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedfit.config import Config
from fedfit.engine.experiment import resume_run, run
from fedfit.engine.runfolder import RunFolder
from fedfit.log import log

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TOML = ROOT / "examples" / "default.toml"


def run_and_read(config: Config, resume: bool = False) -> dict[str, Any]:
    """Run ``config`` (overwriting its run folder) and return its figures: the curve of
    evaluations (round, accuracy or perplexity, eval loss, cumulative training-only wall time, cumulative
    client FLOPs and upload bytes), the final and best accuracy (or perplexity), the majority baseline and
    the per-client costs from summary.json."""
    t0 = time.perf_counter()

    def progress(round_: int, total: int, evaluation: dict[str, Any] | None) -> None:
        shown = ""
        if evaluation:
            key = "accuracy" if "accuracy" in evaluation else "perplexity"
            shown = f", {key} {evaluation[key]:.3f}"
        log(f"    round {round_}/{total}{shown} ({time.perf_counter() - t0:.0f} s)")

    run_dir = RunFolder.of(config).path
    if resume and _resumable(run_dir, config):
        # the same config stopped part-way: continue it (resume_run re-reads config.toml)
        run_dir = resume_run(run_dir, progress=progress, plots=False)
    else:
        run_dir = run(config, overwrite=True, progress=progress, plots=False)
    return {**read_figures(run_dir), "process_wall_s": round(time.perf_counter() - t0, 1)}


def read_figures(run_dir: Path) -> dict[str, Any]:
    """A finished run folder's figures (see ``run_and_read``). Per-client costs are the
    training rounds' (round 0, a class-mean head's pass, is in the cumulative totals only)."""
    folder = RunFolder(run_dir)
    summary = folder.summary()
    timing = {r["round"]: r for r in folder.timing()}
    # classification: accuracy; causal LM: perplexity (the curve and final/best use its name)
    metric = "accuracy" if "accuracy" in summary["final"] else "perplexity"
    train_s, curve = 0.0, []
    for r in folder.rounds():
        train_s += timing[r["round"]]["train_s"]  # training only, evaluation excluded
        if "eval" in r:
            curve.append(
                {"round": r["round"], metric: r["eval"][metric],
                 "loss": r["eval"]["loss"], "client_flops": r["cum_client_flops"],
                 "upload_bytes": r["cum_upload_bytes"], "train_s": round(train_s, 2)}
            )  # fmt: skip
    per_client = summary["per_client"]  # training rounds only
    start = summary.get("start") or {}
    return {
        "run_dir": str(run_dir),
        "metric": metric,
        f"start_{metric}": start.get(metric),
        "start_loss": start.get("loss"),
        "prior_loss": summary.get("prior_loss"),
        "learned": summary.get("learned"),
        "rounds": summary["rounds_completed"],
        "cum_client_flops": summary["cum_client_flops"],
        "cum_upload_bytes": summary["cum_upload_bytes"],
        f"final_{metric}": summary["final"][metric],
        "final_loss": summary["final"]["loss"],
        f"best_{metric}": summary["best"][metric],
        "majority_baseline": summary["majority_baseline"],
        "trainable_params": summary["trainable_params"],
        "curve": curve,
        "train_s": round(train_s, 1),
        "peak_memory_bytes_max": per_client["peak_memory_bytes_max"],
        "flops_per_client_round": per_client["flops_mean"],
        "upload_bytes_per_client": per_client["upload_bytes_mean"],
        "download_bytes_per_client": per_client["download_bytes_mean"],
    }


def _resumable(run_dir: Path, config: Config) -> bool:
    """A run folder holding a checkpoint of this very config (a benchmark cell stopped
    part-way) that has not finished yet."""
    from fedfit.config import to_toml

    folder = RunFolder(run_dir)
    if not folder.has_checkpoint() or not folder.has_config():
        return False
    # the same config wherever the folder is reached from (a moved or linked checkout)
    saved = folder.config()
    saved = dataclasses.replace(
        saved, run=dataclasses.replace(saved.run, output_dir=config.run.output_dir)
    )
    if to_toml(saved) != to_toml(config):
        return False
    done = folder.rounds()
    return not done or done[-1]["round"] < config.run.rounds


def fill_sizes(args: Any, sizes: dict[str, Any]) -> None:
    """Give every size flag the user left unset its value from ``sizes`` (FULL or QUICK)."""
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def notes_lines(result: dict[str, Any]) -> list[str]:
    """The result's notes and caveats as markdown bullets (and a blank line), or nothing."""
    notes = [*result["notes"], *result.get("caveats", [])]
    return [f"- {note}" for note in notes] + ([""] if notes else [])


def by_round_table(
    title: str, label: str, rows: list[dict[str, Any]], key: str, cell: Callable[[dict], str]
) -> list[str]:
    """A markdown table of each row's evaluations by round: ``rows[i][key]`` names the row,
    ``cell(point)`` formats one evaluation of its curve."""
    if not rows:
        return []
    evals = [p["round"] for p in rows[0]["curve"]]
    out = ["", f"{title}:", "", f"| {label} | " + " | ".join(f"r{e}" for e in evals) + " |",
           "|---|" + "---|" * len(evals)]  # fmt: skip
    for r in rows:
        out.append(f"| {r[key]} | " + " | ".join(cell(p) for p in r["curve"]) + " |")
    return out


def write_outputs(
    result: dict[str, Any],
    out: Path,
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any]], Figure],
) -> None:
    """``out``.json (the whole result), .md (its table) and, once there are rows, .png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    if result["rows"]:
        plot(result).savefig(out.with_suffix(".png"), dpi=120)
