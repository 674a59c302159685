"""Poisoning and differential privacy: what attackers cost with and without robust
aggregation, and what client-level DP costs, on one federated LoRA run.

    .venv/bin/python benchmarks/robustness.py            # about 45 min on one core
    .venv/bin/python benchmarks/robustness.py --quick    # tiny-bert smoke test, ~1 min

Setting: examples/default.toml (tweets, 100 clients with Dirichlet(0.5) label skew, 10 per
round, LoRA r = 8 + head, 4 local AdamW steps of batch 16) on minilm-l3, from a random head,
evaluated every 3 rounds on 500 held-out tweets.

- Poisoning: a share of the population (0, 10, 20, 30%, drawn once from the run seed) are
  sign-flippers: each sends its honest change reversed and scaled by 4 (``attack.kind =
  "sign_flip"``, ``attack.scale = 4``), so that at 20% the mean of the changes is about zero.
  Each share runs with the plain mean (FedAvg), the coordinate-wise median, the trimmed mean
  (trim 0.3: 3 of 10 dropped at each end) and, at 20%, multi-Krum (f = 3). The goal of the
  issue: 20% sign-flippers cost at most 2 points with a robust rule, while FedAvg loses more.
- DP-FedAvg (fedfit/privacy.py): noise multipliers that reach epsilon = 1, 4, 8 at delta =
  1e-3 after the run's rounds at sampling rate 10/100 (from opacus's own
  ``get_noise_multiplier``, RDP accountant), clip norm 1.0, against the same run without DP.

Every cell is a resumable run folder under runs/bench/robustness; the ledger
benchmarks/results/robustness.json keeps finished cells, so a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cells import RUNS, Cell, Ledger, pct, run_cell
from common import DEFAULT_TOML, RESULTS, log, read_figures

from fedfit.engine.runfolder import RunLocked
from fedfit.errors import RunStopped

FRACTIONS = (0.0, 0.1, 0.2, 0.3)
RULES = {
    "mean": [],
    "median": ["server.aggregation=median"],
    "trimmed_mean": ["server.aggregation=trimmed_mean", "server.trim=0.3"],
    "multi_krum": ["server.aggregation=multi_krum", "server.krum_f=3"],
}
EPSILONS = (8.0, 4.0, 1.0)
DELTA = 1e-3
FULL = ["model.name=minilm-l3", "run.rounds=15", "run.eval_every=3", "data.eval_examples=500",
        "run.threads=1"]  # fmt: skip
QUICK = ["model.name=tiny-bert", "model.max_length=32", "data.num_clients=20",
         "run.rounds=3", "run.eval_every=1", "data.eval_examples=100", "train.local_steps=2"]  # fmt: skip
ATTACK = ["attack.kind=sign_flip", "attack.scale=4"]


def noise_for(epsilon: float, rounds: int, rate: float) -> float:
    """The noise multiplier that spends ``epsilon`` (at DELTA) in ``rounds`` rounds."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA,
                                      sample_rate=rate, steps=rounds, accountant="rdp"))  # fmt: skip


def poison_cell(fraction: float, rule: str) -> Cell:
    attack = [*ATTACK, f"attack.fraction={fraction}"] if fraction else []
    return Cell(f"poison-{int(100 * fraction)}-{rule}", rule, [*attack, *RULES[rule]],
                {"part": "poisoning", "attackers": fraction, "rule": rule})  # fmt: skip


def cells(rounds: int, rate: float) -> list[Cell]:
    """Every cell, in the order of the tables."""
    out = [poison_cell(f, rule) for f in FRACTIONS for rule in RULES
           if rule != "multi_krum" or f == 0.2]  # fmt: skip
    for eps in EPSILONS:
        z = noise_for(eps, rounds, rate)
        sets = [f"privacy.noise_multiplier={z}", "privacy.clip_norm=1.0", f"privacy.delta={DELTA}"]
        out.append(Cell(f"dp-eps{eps:g}", "dp-fedavg", sets,
                        {"part": "privacy", "target_epsilon": eps, "noise_multiplier": z}))  # fmt: skip
    return out


def by_priority(every: list[Cell]) -> list[Cell]:
    """The order cells run in: the mean and the median at every share of attackers, DP, then
    the other robust rules (so that a stopped benchmark has the rows that matter most)."""
    rank = {"mean": 0, "median": 0, "dp-fedavg": 1}
    return sorted(every, key=lambda c: rank.get(c.method, 2))


def run_point(ledger: Ledger, name: str, common: list[str], cell: Cell) -> dict[str, Any] | None:
    """The cell's figures; a run that the server stopped (a diverged model) is a result too,
    its curve up to the stop; None when another process of this benchmark is running it."""
    ledger.refresh()
    try:
        return run_cell(ledger, name, DEFAULT_TOML, common, cell)
    except RunLocked:
        log(f"{cell.key}: another process runs it; next cell")
        return None
    except RunStopped as err:
        run_dir = RUNS / name / cell.key
        figures = {**read_figures(run_dir), "method": cell.method, "key": cell.key,
                   "overrides": cell.overrides, **cell.info, "stopped": str(err)}  # fmt: skip
        ledger.cells[cell.key] = figures
        ledger.save()
        return figures


def epsilon_of(row: dict[str, Any]) -> float | None:
    from fedfit.engine.runfolder import RunFolder

    spent = RunFolder(Path(row["run_dir"])).summary().get("privacy")
    return None if spent is None else spent["epsilon"]


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    clean = next(r for r in rows if r["key"] == "poison-0-mean")
    lines = [f"# Poisoning and differential privacy ({result['benchmark']})", "",
             f"Command: `{result['command']}`", "", result["setting"], "",
             "## Sign-flipping attackers (x4) against the aggregation rule", "",
             "Accuracy after the last round (round 0: the start, the same for every row; "
             "loss: the final held-out loss); the change is against the same rule without "
             "attackers.", "",
             "| attackers | rule | round 0 | final | best | change vs 0% | eval loss | note |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base = {r["rule"]: r for r in rows if r.get("part") == "poisoning" and r["attackers"] == 0}
    for r in (r for r in rows if r.get("part") == "poisoning"):
        ref = base.get(r["rule"])
        change = (
            "-" if ref is None else f"{100 * (r['final_accuracy'] - ref['final_accuracy']):+.1f}"
        )
        note = "stopped: " + r["stopped"].split(".")[0] if r.get("stopped") else ""
        lines.append(
            f"| {100 * r['attackers']:.0f}% | {r['rule']} | {pct(r['start_accuracy'])} | "
            f"{pct(r['final_accuracy'])} | {pct(r['best_accuracy'])} | {change} | "
            f"{r['final_loss']:.3f} | {note} |"
        )
    lines += ["", "## DP-FedAvg (client level)", "",
              "| epsilon (target) | epsilon spent | delta | noise multiplier | round 0 | final | "
              "change vs no DP | eval loss |", "|---|---|---|---|---|---|---|---|",
              f"| none | - | - | 0 | {pct(clean['start_accuracy'])} | {pct(clean['final_accuracy'])} "
              f"| - | {clean['final_loss']:.3f} |"]  # fmt: skip
    for r in (r for r in rows if r.get("part") == "privacy"):
        spent = r.get("epsilon_spent")
        lines.append(
            f"| {r['target_epsilon']:g} | {'-' if spent is None else f'{spent:.2f}'} | {DELTA:g} | "
            f"{r['noise_multiplier']:.3f} | {pct(r['start_accuracy'])} | "
            f"{pct(r['final_accuracy'])} | "
            f"{100 * (r['final_accuracy'] - clean['final_accuracy']):+.1f} | {r['final_loss']:.3f} |"
        )
    lines += ["", "## Verdicts", "", *[f"- {c}" for c in result["claims"]], ""]
    lines += ["Curves (accuracy by round):", "", "| run | " + " | ".join(
        f"r{p['round']}" for p in clean["curve"]) + " |", "|---|" + "---|" * len(clean["curve"])]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['key']} | " + " | ".join(pct(p["accuracy"]) for p in r["curve"]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]]) -> Any:
    """Accuracy by round: the rules at 0% and 20% attackers, and DP-FedAvg."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    poison, private = fig.subplots(1, 2, sharey=True)
    for r in rows:
        rounds = [p["round"] for p in r["curve"]]
        accuracy = [p["accuracy"] for p in r["curve"]]
        if r.get("part") == "poisoning" and r["attackers"] in (0.0, 0.2):
            style = "-" if r["attackers"] == 0.2 else ":"
            poison.plot(rounds, accuracy, style, marker=".", label=r["key"])
        if r.get("part") == "privacy" or r["key"] == "poison-0-mean":
            label = "no DP" if r["key"] == "poison-0-mean" else f"epsilon {r['target_epsilon']:g}"
            private.plot(rounds, accuracy, marker=".", label=label)
    poison.set(xlabel="round (0 = the start)", ylabel="held-out accuracy",
               title="sign-flippers x4: 0% (dotted), 20% (solid)")  # fmt: skip
    private.set(xlabel="round (0 = the start)", title="DP-FedAvg, delta 1e-3")
    poison.legend(fontsize=7)
    private.legend(fontsize=7)
    fig.tight_layout()
    return fig


def claims(rows: list[dict[str, Any]]) -> list[str]:
    poison = {(r["attackers"], r["rule"]): r for r in rows if r.get("part") == "poisoning"}
    out = []
    if (0.2, "mean") in poison and (0.0, "mean") in poison:
        loss = poison[0.0, "mean"]["final_accuracy"] - poison[0.2, "mean"]["final_accuracy"]
        out.append(f"FedAvg (mean) with 20% sign-flippers: {100 * loss:.1f} points lost "
                   "(final accuracy against its clean run)")  # fmt: skip
    fedavg = poison.get((0.0, "mean"))
    for rule in ("median", "trimmed_mean", "multi_krum"):
        if (0.2, rule) not in poison or fedavg is None:
            continue
        attacked = poison[0.2, rule]["final_accuracy"]
        own = poison.get((0.0, rule))
        parts = []
        for label, clean in (("its own clean run", own), ("clean FedAvg", fedavg)):
            if clean is None:
                continue
            change = attacked - clean["final_accuracy"]
            parts.append(f"{100 * change:+.1f} points against {label} "
                         f"({'met' if change >= -0.02 else 'not met'})")  # fmt: skip
        out.append(f"{rule} with 20% sign-flippers (goal: at most 2 points lost): "
                   + "; ".join(parts))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-bert smoke test")
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="take the cells last-first (a second process beside the first shares its ledger)",
    )
    args = parser.parse_args()
    common = ["model.head_init=random", *(QUICK if args.quick else FULL)]
    name = "robustness" + ("-quick" if args.quick else "")
    out = Path("/tmp") / name if args.quick else RESULTS / name
    rounds = int(next(s for s in common[::-1] if s.startswith("run.rounds=")).split("=")[1])
    clients = 20 if args.quick else 100
    setting = (f"{' '.join(common)} on examples/default.toml; sign-flippers x4 (attack.scale = 4); "
               f"DP at delta = {DELTA:g}, clip norm 1.0, sampling rate 10/{clients}.")  # fmt: skip
    ledger = Ledger(
        out.with_suffix(".json"), {"setting": setting, "benchmark": name, "base": common}
    )
    command = "python benchmarks/robustness.py" + (" --quick" if args.quick else "")
    every = cells(rounds, 10 / clients)
    order = by_priority(every)
    for cell in order[::-1] if args.reverse else order:
        if run_point(ledger, name, common, cell) is None:
            continue
        rows = [ledger.cells[c.key] for c in every if c.key in ledger.cells]
        for row in rows:
            if row.get("part") == "privacy" and "epsilon_spent" not in row:
                row["epsilon_spent"] = epsilon_of(row)
        result = {"benchmark": name, "setting": setting, "rows": rows, "command": command,
                  "claims": claims(rows)}  # fmt: skip
        ledger.data.update(result)
        ledger.save()
        if any(r["key"] == "poison-0-mean" for r in rows):
            out.with_suffix(".md").write_text(markdown(result))
            plot(rows).savefig(out.with_suffix(".png"), dpi=110)
    log(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
