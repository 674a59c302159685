"""The client learning rate of benchmarks/communication.py, swept on a short budget.

    .venv/bin/python benchmarks/communication_lr.py [--rounds 8] [--lrs 3e-4,1e-3,3e-3]

communication.py runs every configuration at one client lr (``--lr``). This script runs the
configurations it names (default: fedavg-fp32 and partial-1/4-4bit) at each lr of ``--lrs``
for ``--rounds`` rounds, everything else at communication.py's defaults, and reports the
held-out perplexity at the end of the budget, the lr with the lowest marked per
configuration. Each lr is one communication.py run (its own JSON under ``--runs-dir``), so a
stopped sweep continues where it was. Writes ``--out``.json / .md / .png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import communication
from cells import RUNS, pick
from common import RESULTS, log, write_outputs
from matplotlib.figure import Figure


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per run (8)")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="client lrs, comma-separated")
    parser.add_argument("--configs", default="fedavg-fp32,partial-1/4-4bit")
    parser.add_argument("--out", default=str(RESULTS / "communication_lr"))
    parser.add_argument("--runs-dir", default=str(RUNS / "communication_lr"))
    parser.add_argument("--quick", action="store_true", help="smoke test: communication.py --quick")
    args = parser.parse_args(argv)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.configs = args.configs.split(",")
    unknown = [c for c in args.configs if c not in communication.CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; known: {', '.join(communication.CONFIGS)}")
    return args


def sweep_point(args: argparse.Namespace, lr: float) -> dict[str, Any]:
    """communication.py at client lr ``lr`` (lora's lr too), ``--rounds`` rounds."""
    folder = Path(args.runs_dir) / f"lr{lr:g}"
    communication.main(
        [
            *("--rounds", str(args.rounds), "--eval-every", str(args.rounds)),
            *("--lr", f"{lr:g}", "--lora-lr", f"{lr:g}", "--configs", ",".join(args.configs)),
            *("--out", str(folder / "communication"), "--runs-dir", str(folder)),
            *(["--quick"] if args.quick else []),
        ]
    )
    return json.loads((folder / "communication.json").read_text())


def markdown(result: dict[str, Any]) -> str:
    lrs = result["lrs"]
    lines = [
        "# Communication benchmark: client learning rate sweep",
        "",
        f"Command: `{result['command']}`",
        "",
        "{model}, shakespeare, {num_clients} clients, {clients_per_round} per round, "
        "{local_steps} local {optimizer} steps of batch {batch_size}, length {max_length}, "
        "server FedAvg lr 1 (communication.py's defaults), {rounds} rounds per run; held-out "
        "perplexity ({eval_examples} speeches) at the last round. ".format(**result["setting"])
        + f"Perplexity before fine-tuning: {result['pretrained_perplexity']:.1f}. "
        "* marks the lowest per configuration.",
        "",
        "| configuration | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for row in result["rows"]:
        cells = []
        for lr in lrs:
            ppl = row["final"].get(f"{lr:g}")
            cells.append(
                "-" if ppl is None else f"{ppl:.1f}" + ("*" if lr == row["best_lr"] else "")
            )
        lines.append(f"| {row['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for row in result["rows"]:
        points = sorted((float(lr), ppl) for lr, ppl in row["final"].items())
        ax.plot(*zip(*points, strict=True), marker="o", label=row["config"])
    ax.set(xscale="log", yscale="log", xlabel="client lr",
           ylabel=f"perplexity at round {result['rounds']}")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/communication_lr.py", *argv])
    result: dict[str, Any] = {"command": command, "rounds": args.rounds, "lrs": args.lrs}
    points: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
    for lr in args.lrs:
        log(f"client lr {lr:g}")
        point = sweep_point(args, lr)
        result["pretrained_perplexity"] = point["pretrained_perplexity"]
        result["setting"] = point["args"]
        for row in point["rows"]:
            points[row["config"]].append({"lr": lr, **row})
        result["rows"] = []
        for config, runs in points.items():
            best = pick(runs)  # lowest final eval loss: the lowest perplexity
            result["rows"].append({
                "config": config,
                "final": {f"{r['lr']:g}": r["final_perplexity"] for r in runs},
                "best_lr": None if best is None else best["lr"],
            })  # fmt: skip
        write_outputs(result, Path(args.out), markdown, plot)
    print(markdown(result))


if __name__ == "__main__":
    main()
