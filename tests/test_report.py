"""Tests for fedfit.report on hand-written run folders with known numbers.

The synthetic classification run: 4 rounds, 2 clients per round, evaluation on rounds 2 and 4.
Each client uploads 1.5 MB, downloads 2 MB and spends 33.5 GFLOP per round, so a round moves
3 MB up and costs 67 GFLOP; after 4 rounds: 12 MB up, 16 MB down, 268 GFLOP. Client peak memory
alternates 214 MB / 148 MB (the backprop vs jvp numbers of docs/offline.md).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fedfit import report
from fedfit.report import (
    compare_runs,
    format_bytes,
    format_duration,
    format_flops,
    load_run,
    metric_series,
    plot_client_costs,
    plot_metric,
    print_report,
    summary_rows,
    write_plots,
)

UP, DOWN, FLOPS = 1_500_000, 2_000_000, 33_500_000_000
PEAKS = (214_000_000, 148_000_000)
EVALS = {2: 0.55, 4: 0.62}  # accuracy on evaluation rounds
PPL = {2: 80.0, 4: 40.0}


def _rounds(task: str, n_rounds: int = 4) -> list[dict[str, Any]]:
    rows = []
    for r in range(1, n_rounds + 1):
        row: dict[str, Any] = {
            "round": r,
            "wall_s": 20.75 * r,
            "num_clients": 2,
            "train_loss": 1.0 / r,
            "upload_bytes": 2 * UP,
            "download_bytes": 2 * DOWN,
            "client_flops": 2 * FLOPS,
            "cum_upload_bytes": 2 * UP * r,
            "cum_download_bytes": 2 * DOWN * r,
            "cum_client_flops": 2 * FLOPS * r,
        }
        if r in EVALS:
            if task == "lm":
                row["eval"] = {"loss": 4.0, "perplexity": PPL[r], "num_examples": 100}
            else:
                row["eval"] = {"accuracy": EVALS[r], "loss": 1.2 - 0.1 * r, "num_examples": 500}
        rows.append(row)
    return rows


def _clients(n_rounds: int = 4) -> list[dict[str, Any]]:
    rows = []
    for r in range(1, n_rounds + 1):
        for cid, peak in enumerate(PEAKS):
            rows.append(
                {
                    "round": r,
                    "client_id": cid,
                    "num_examples": 64,
                    "steps": 4,
                    "train_loss": 1.0 / r,
                    "upload_bytes": UP,
                    "download_bytes": DOWN,
                    "flops": FLOPS,
                    "peak_memory_bytes": peak,
                    "memory": {"peak_bytes": peak},
                    "wall_s": 10.0,
                }
            )
    return rows


def make_run(
    root: Path,
    name: str = "cls-a",
    task: str = "classification",
    method: str = "fedavg",
    summary: bool = True,
) -> Path:
    """Write a run folder by hand; returns its path."""
    path = root / name
    path.mkdir(parents=True)
    (path / "config.toml").write_text(
        f'[run]\nname = "{name}"\nseed = 0\nrounds = 4\n\n[model]\nname = "minilm-l6"\n\n'
        f'[data]\nname = "tweets"\n\n[method]\nname = "{method}"\nlr = 1e-3\n\n'
        '[server]\noptimizer = "fedavg"\n',
        encoding="utf-8",
    )
    lines = [json.dumps(r) for r in _rounds(task)]
    (path / "rounds.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = [json.dumps(c) for c in _clients()]
    (path / "clients.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if summary:
        metric = "perplexity" if task == "lm" else "accuracy"
        best_round = 4
        s = {
            "name": name,
            "method": method,
            "model": "minilm-l6",
            "dataset": "tweets",
            "task": task,
            "rounds_completed": 4,
            "final": _rounds(task)[3]["eval"] | {"round": 4},
            "best": {metric: _rounds(task)[best_round - 1]["eval"][metric], "round": best_round},
            "majority_baseline": 0.424 if task == "classification" else None,
            "wall_s": 83.0,
            "excluded_clients": 3,
            "per_client": {
                "peak_memory_bytes_max": max(PEAKS),
                "flops_mean": FLOPS,
                "upload_bytes_mean": UP,
                "download_bytes_mean": DOWN,
            },
        }
        (path / "summary.json").write_text(json.dumps(s), encoding="utf-8")
    return path


def _render(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (999, "999 B"),
        (1000, "1.00 kB"),
        (1_500_000, "1.50 MB"),
        (12_000_000, "12.0 MB"),
        (214_000_000, "214 MB"),
        (999_999, "1.00 MB"),  # rounds up across the prefix boundary, not "1000 kB"
        (9_996_000, "10.0 MB"),
        (2.5e9, "2.50 GB"),
        (-3_000_000, "-3.00 MB"),
        (None, "n/a"),
    ],
)
def test_format_bytes(n: float | None, expected: str) -> None:
    assert format_bytes(n) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [(67e9, "67.0 GFLOP"), (268e9, "268 GFLOP"), (1.2e12, "1.20 TFLOP"), (50, "50 FLOP")],
)
def test_format_flops(n: float, expected: str) -> None:
    assert format_flops(n) == expected


@pytest.mark.parametrize(
    ("s", "expected"),
    [(12.34, "12.3 s"), (83.0, "1.4 min"), (3540, "59.0 min"), (7380, "2.05 h"), (None, "n/a")],
)
def test_format_duration(s: float | None, expected: str) -> None:
    assert format_duration(s) == expected


def test_log_axis_tick_labels_are_compact_human_units() -> None:
    fmt = report._tick_formatter("B")
    assert [fmt(v) for v in (1e6, 1e7, 2e9, 0)] == ["1 MB", "10 MB", "2 GB", ""]
    minor = report._tick_formatter("FLOP", frozenset({2, 5}))
    assert [minor(v) for v in (2e12, 3e12, 5e10)] == ["2 TFLOP", "", "50 GFLOP"]
    assert report._tick_formatter("", frozenset({3}))(300.0) == "300"  # log perplexity axis


# --------------------------------------------------------------------------- loading


def test_load_run_parses_all_files(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path))
    assert len(run.rounds) == 4 and len(run.clients) == 8
    assert run.config["server"]["optimizer"] == "fedavg"
    assert (run.name, run.method, run.model, run.dataset) == (
        "cls-a",
        "fedavg",
        "minilm-l6",
        "tweets",
    )
    assert (run.task, run.metric) == ("classification", "accuracy")
    assert [r["round"] for r in run.eval_rounds] == [2, 4]
    assert run.majority_baseline == 0.424


def test_load_run_without_summary_falls_back_to_config_and_rounds(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, name="lm-run", task="lm", method="fedmezo", summary=False))
    assert run.summary == {}
    assert (run.name, run.method, run.dataset) == ("lm-run", "fedmezo", "tweets")
    assert (run.task, run.metric) == ("lm", "perplexity")  # inferred from the eval keys


def test_corrupt_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = make_run(tmp_path)
    lines = (path / "rounds.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]  # a run killed mid-write
    (path / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"rounds\.jsonl:3: not valid JSON"):
        load_run(path)


def test_non_object_jsonl_line_is_rejected(tmp_path: Path) -> None:
    path = make_run(tmp_path)
    with (path / "clients.jsonl").open("a") as f:
        f.write("[1, 2]\n")
    with pytest.raises(ValueError, match=r"clients\.jsonl:9: expected a JSON object"):
        load_run(path)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        load_run(tmp_path / "nope")
    path = make_run(tmp_path)
    (path / "rounds.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"rounds\.jsonl"):
        load_run(path)


# --------------------------------------------------------------------------- tables

EXPECTED_ROWS = [
    ("task", "classification"),
    ("rounds completed", "4"),
    ("final accuracy", "62.00% (round 4)"),
    ("best accuracy", "62.00% (round 4)"),
    ("final eval loss", "0.800"),
    ("majority baseline", "42.40%"),
    ("wall time", "1.4 min"),
    ("total upload (all clients)", "12.0 MB"),
    ("total download (all clients)", "16.0 MB"),
    ("total client compute", "268 GFLOP"),
    ("per client: peak memory (max)", "214 MB"),
    ("per client: FLOPs per round (mean)", "33.5 GFLOP"),
    ("per client: upload per round (mean)", "1.50 MB"),
    ("per client: download per round (mean)", "2.00 MB"),
    ("excluded clients", "3"),
]


def test_summary_rows_from_summary_json(tmp_path: Path) -> None:
    assert summary_rows(load_run(make_run(tmp_path))) == EXPECTED_ROWS


def test_summary_rows_computed_without_summary_json(tmp_path: Path) -> None:
    """Same numbers derived from rounds.jsonl / clients.jsonl alone (a run still in progress)."""
    rows = dict(summary_rows(load_run(make_run(tmp_path, summary=False))))
    expected = dict(EXPECTED_ROWS)
    # Only summary.json knows these; wall time comes from the last round (4 * 20.75 s).
    expected |= {"majority baseline": "n/a", "excluded clients": "n/a", "wall time": "1.4 min"}
    assert rows == expected


def test_run_without_evaluations_reports_na(tmp_path: Path) -> None:
    path = make_run(tmp_path, summary=False)
    rounds = [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]
    (path / "rounds.jsonl").write_text("\n".join(json.dumps(r | {"eval": None}) for r in rounds))
    run = load_run(path)
    rows = dict(summary_rows(run))
    assert (run.task, rows["final loss"], rows["total upload (all clients)"]) == (
        "unknown",
        "n/a",
        "12.0 MB",
    )
    ax = plot_metric(run, "upload").axes[0]
    assert ax.texts[0].get_text() == "no evaluation rounds" and ax.get_xscale() == "linear"


def test_best_is_lowest_perplexity_when_computed(tmp_path: Path) -> None:
    rows = dict(summary_rows(load_run(make_run(tmp_path, task="lm", summary=False))))
    assert rows["best perplexity"] == "40.00 (round 4)"
    assert "majority baseline" not in rows


def test_summary_table_renders_human_units(tmp_path: Path) -> None:
    text = _render(report.summary_table(load_run(make_run(tmp_path))))
    for needle in ("run cls-a", "fedavg · minilm-l6 · tweets", "1.50 MB", "268 GFLOP", "214 MB"):
        assert needle in text


def test_eval_table_keeps_first_and_last_when_compacting() -> None:
    assert report._evenly(list(range(100)), 5) == [0, 25, 50, 74, 99]
    assert report._evenly([1, 2], 5) == [1, 2]


# --------------------------------------------------------------------------- plots


def test_metric_series_per_x_axis(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path))
    assert metric_series(run, "round") == ([2.0, 4.0], [0.55, 0.62])
    assert metric_series(run, "upload") == ([6e6, 12e6], [0.55, 0.62])
    assert metric_series(run, "flops") == ([134e9, 268e9], [0.55, 0.62])
    assert metric_series(run, "wall") == ([41.5, 83.0], [0.55, 0.62])


def test_plot_metric_draws_the_input_data(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path))
    ax = plot_metric(run, "upload").axes[0]
    curve, baseline = ax.lines
    assert list(curve.get_xdata()) == [6e6, 12e6]
    assert list(curve.get_ydata()) == [0.55, 0.62]
    assert curve.get_marker() == "o"
    assert list(baseline.get_ydata()) == [0.424, 0.424] and baseline.get_linestyle() == "--"
    assert ax.get_xscale() == "log"
    assert "cls-a" in ax.get_title() and "minilm-l6" in ax.get_title()
    assert "bytes" in ax.get_xlabel() and "%" in ax.get_ylabel()


def test_plot_metric_lm_uses_perplexity(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, task="lm"))
    ax = plot_metric(run, "flops").axes[0]
    assert len(ax.lines) == 1  # no majority baseline for a language model
    assert list(ax.lines[0].get_ydata()) == [80.0, 40.0]
    assert "perplexity" in ax.get_ylabel()


def test_client_cost_histograms_count_every_client_update(tmp_path: Path) -> None:
    fig = plot_client_costs(load_run(make_run(tmp_path)))
    memory, flops, upload, download = fig.axes
    for ax in (memory, flops, upload, download):
        assert sum(p.get_height() for p in ax.patches) == 8  # 4 rounds x 2 clients
    assert memory.get_xlabel() == "peak memory (MB)"
    assert list(memory.lines[0].get_xdata()) == [181.0, 181.0]  # mean of 214 and 148 MB
    assert flops.get_xlabel() == "compute per round (GFLOP)"
    assert list(flops.lines[0].get_xdata()) == [33.5, 33.5]
    assert upload.get_xlabel() == "upload per round (MB)"


def test_write_plots_writes_valid_pngs(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path))
    paths = write_plots(run)
    names = sorted(p.name for p in paths)
    assert names == [
        "accuracy_vs_flops.png",
        "accuracy_vs_round.png",
        "accuracy_vs_upload.png",
        "client_costs.png",
        "train_loss.png",
    ]
    for p in paths:
        assert p.parent == run.path / "plots"
        width, height = _png_size(p)
        assert width > 600 and height > 400  # 7 x 4.5 in at 150 dpi, trimmed to content


def test_print_report_prints_tables_and_plot_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # write_plots is tested above; a stub keeps this test from drawing the same PNGs again.
    drawn: list[Path] = []

    def fake_write_plots(run: report.RunRecord, out_dir: Path | None = None) -> list[Path]:
        drawn.append(run.path)
        return [run.path / "plots" / "a[1].png", run.path / "plots" / "b.png"]

    monkeypatch.setattr(report, "write_plots", fake_write_plots)
    path = make_run(tmp_path)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_report(path, console=console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert drawn == [path]
    assert "evaluation rounds" in text and "55.00%" in text and "62.00%" in text
    assert "1.50 MB" in text and "12.0 MB" in text  # summary table, then cum upload at round 4
    assert f"wrote {path / 'plots' / 'a[1].png'}" in text  # paths printed verbatim, not as markup


# --------------------------------------------------------------------------- comparison


def test_compare_overlays_one_line_per_run(tmp_path: Path) -> None:
    a = make_run(tmp_path, name="cls-a", method="fedavg")
    b = make_run(tmp_path, name="cls-b", method="lora")
    c = make_run(tmp_path / "other", name="cls-a", method="fedmezo")  # same name, other folder
    console = Console(file=io.StringIO(), width=250, color_system=None)
    paths = compare_runs([a, b, c], tmp_path / "cmp", console=console)
    assert sorted(p.name for p in paths) == sorted(
        f"compare_accuracy_vs_{x}.png" for x in ("round", "upload", "flops", "wall")
    )
    for p in paths:
        _png_size(p)
    runs = report._unique_labels([load_run(p) for p in (a, b, c)])
    ax = plot_metric(runs, "round").axes[0]
    curves = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(curves) == 3 and len(ax.lines) == 4  # 3 runs + one shared majority baseline
    labels = [line.get_label() for line in curves]
    assert labels[1] == "cls-b (lora)" and len(set(labels)) == 3
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "cls-b (lora)" in text and "other/cls-a (fedmezo)" in text


def test_comparison_table_has_one_column_per_run(tmp_path: Path) -> None:
    a = load_run(make_run(tmp_path, name="cls-a", method="fedavg"))
    b = load_run(make_run(tmp_path, name="cls-b", method="lora"))
    table = report.comparison_table([a, b])
    assert [str(c.header) for c in table.columns] == ["quantity", "cls-a (fedavg)", "cls-b (lora)"]
    text = _render(table)
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") == 4}
    for quantity, value in [
        ("final accuracy", "62.00%"),
        ("total upload", "12.0 MB"),
        ("total client compute", "268 GFLOP"),
        ("client peak memory (max)", "214 MB"),
    ]:
        assert lines[quantity].count(value) == 2, quantity
    assert "model" not in lines and "model minilm-l6, dataset tweets" in text  # shared -> caption


def test_compare_mixed_tasks_raises_naming_runs(tmp_path: Path) -> None:
    a = make_run(tmp_path, name="cls-a")
    b = make_run(tmp_path, name="shakes", task="lm")
    with pytest.raises(ValueError, match=r"different tasks.*cls-a \(classification.*shakes \(lm"):
        compare_runs([a, b], tmp_path / "cmp", console=Console(file=io.StringIO()))
