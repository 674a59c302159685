"""Every device takes part: a mixed-method federation against each of its methods alone.

    .venv/bin/python benchmarks/mixed.py                 # sweep, then both settings (resumable)
    .venv/bin/python benchmarks/mixed.py --quick         # tiny-bert smoke test, ~2 min

Population: examples/heterogeneous.toml (tweets, minilm-l6, 100 clients in four memory tiers
of 1/8, 1/4, 1/2 and 1x of full fine-tuning's peak, 10 clients per round, 4 local steps of
batch 16, server FedAvg), from its random head (round 0 the same
for every run), ``run.lanes = 2`` and length-bucketed batches for speed.

Runs, in each setting: ``auto`` (the default method.candidates: lora, spry, fedmezo, head and
the head over a bfloat16 backbone, each device the first that fits) and each single method
alone, which excludes the tiers it cannot fit: lora, spry, fedmezo (on LoRA r = 8, as in the
mixed run), head, head-bf16 (the head over a bfloat16 backbone: the one method that fits
every tier) and layer fine-tuning (the full-weight family's method).

Learning rates: each single method's client lr from a sweep (``LRS``, 10 rounds on the
dirichlet setting, lowest final eval loss); auto runs each candidate at its method's winner
(``"lora lr=..."``), head-bf16 at head's. Long runs: 40 rounds, evaluated every 5.

Settings:
- ``dirichlet``: the example's Dirichlet(0.5) label skew over clients;
- ``tier_skew``: the low tiers hold a class the full tier lacks. A CSV of the tweets train set
  where every ``negative`` tweet sits on a client of the 1/8, 1/4 or 1/2 tier and the full
  tier holds only neutral and positive ones (every client 200 tweets; tiers assigned as the
  engine assigns them from the run seed); evaluation on the standard test set.

Per run: participation (share of devices, and of training examples, that ever trained), the
accuracy curve from round 0, per tier the method, client FLOPs per round, upload per client
and the largest measured peak memory against the tier's budget. The claim tested: the mixed
federation reaches at least the best single method's accuracy while more devices take part;
in ``tier_skew`` excluding the low tiers must cost accuracy.

Every cell is a resumable run folder under runs/bench/mixed; the ledger
benchmarks/results/mixed.json keeps finished cells, so a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from cells import RUNS, Cell, Ledger, at_edge, learned, pct, run_cell, sweep, sweep_table
from common import RESULTS, ROOT, log, write_outputs

from fedfit.units import format_bytes, format_flops

EXAMPLE = ROOT / "examples" / "heterogeneous.toml"
# auto's candidates, strongest first (the default list), as the single-method rows name them
CANDIDATES = {"lora": "lora", "spry": "spry", "fedmezo": "fedmezo", "head": "head",
              "head-bf16": "head frozen_dtype=bfloat16"}  # fmt: skip
METHODS = ("auto", "lora", "spry", "fedmezo", "head", "head-bf16", "layers")
SETTINGS = ("dirichlet", "tier_skew")
FULL = ["data.eval_examples=500", "run.lanes=2", "train.bucket_by_length=true"]
SWEEP = ["run.rounds=10", "run.eval_every=10"]  # each lr of a method's grid, dirichlet
LONG = ["run.rounds=40", "run.eval_every=5"]
QUICK_LONG = ["run.rounds=2", "run.eval_every=1"]
LRS = {  # client lr grids (head-bf16 takes head's winner: the same method, another precision)
    "lora": (1e-3, 3e-3, 1e-2),
    "spry": (3e-4, 1e-3, 3e-3),
    "fedmezo": (3e-4, 1e-3, 3e-3, 1e-2),
    "head": (3e-3, 1e-2, 3e-2),
    "layers": (3e-5, 1e-4, 3e-4),
}
QUICK = ["model.name=tiny-bert", "model.max_length=32", "data.num_clients=20",
         "data.eval_examples=60", "train.local_steps=2", "data.min_examples=5"]  # fmt: skip
PER_CLIENT = 200  # tweets per client in tier_skew (equal sizes keep the natural order by id)
LOW_CLASS = 0  # "negative": only on low-tier clients in tier_skew


def method_sets(method: str, lrs: dict[str, float] | None = None) -> list[str]:
    """A method's --set strings; ``auto``'s candidates each at its own chosen lr."""
    if method == "auto":
        lrs = lrs or {}
        names = [CANDIDATES[c] + (f" lr={lrs[c]}" if c in lrs else "") for c in CANDIDATES]
        return ["method.name=auto", f"method.candidates={json.dumps(names)}"]
    if method == "fedmezo":  # on LoRA (its default is full weights), as in the mixed run
        return ["method.name=fedmezo", "method.peft=lora"]
    if method == "head-bf16":
        return ["method.name=head", "method.frozen_dtype=bfloat16"]
    return [f"method.name={method}"]


def tier_skew_csv(folder: Path, sets: list[str]) -> tuple[Path, Path]:
    """The tier_skew train and test CSVs (written once): see the module docstring."""
    import numpy as np

    from fedfit.config import load_config
    from fedfit.data import load_dataset
    from fedfit.devices import Reference, build_population

    config = load_config(EXAMPLE, sets)
    train, test = folder / "tweets_tier_skew.csv", folder / "tweets_test.csv"
    if train.exists() and test.exists():
        return train, test
    folder.mkdir(parents=True, exist_ok=True)
    n = config.data.num_clients
    # which client is on which tier: the engine's own assignment (fractions unresolved: any
    # reference gives the same tiers)
    tiers = build_population(config.devices, n, Reference(1, 1, 1, 1), config.run.seed).tier_names
    top = config.devices.tiers[-1].split()[0]
    low = [c for c in range(n) if tiers[c] != top]
    data = load_dataset("tweets")
    labels = np.asarray(data.train_labels)
    rng = np.random.default_rng(config.run.seed)
    negative = rng.permutation(np.flatnonzero(labels == LOW_CLASS))
    others = rng.permutation(np.flatnonzero(labels != LOW_CLASS))
    share = min(len(negative) // len(low), PER_CLIENT // 2)
    rows, used_other = [], 0
    for c in range(n):
        take = share if c in low else 0
        picked = list(negative[low.index(c) * share : low.index(c) * share + take]) if take else []
        rest = PER_CLIENT - len(picked)
        picked += list(others[used_other : used_other + rest])
        used_other += rest
        rows += [(data.train_texts[i], int(labels[i]), f"c{c:04d}") for i in picked]
    with train.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "client"])
        writer.writerows(rows)
    with test.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(data.test_texts, map(int, data.test_labels), strict=True))
    return train, test


def setting_sets(setting: str, sizes: list[str], work: Path) -> list[str]:
    if setting == "dirichlet":
        return []
    train, test = tier_skew_csv(work, sizes)
    return [f"data.path={train}", f"data.test_path={test}", "data.label_column=label",
            "data.client_column=client", "data.partition=natural", "data.name=tweets-tier-skew",
            "data.min_examples=1"]  # fmt: skip


def tiers_of(run_dir: Path) -> dict[str, Any]:
    """Per tier from clients.jsonl: method, client updates, FLOPs and upload per update, the
    largest measured peak against the budget, and the devices / examples that ever trained."""
    from fedfit.engine.runfolder import RunFolder

    folder = RunFolder(run_dir)
    rows = [c for c in folder.clients() if c["round"] > 0 and c.get("steps")]
    out: dict[str, Any] = defaultdict(lambda: {"updates": 0, "flops": 0, "upload": 0,
                                               "peak": 0, "budget": None, "methods": set(),
                                               "devices": set()})  # fmt: skip
    for c in rows:
        t = out[c["tier"]]
        t["updates"] += 1
        t["flops"] += c["flops"]
        t["upload"] += c["upload_bytes"]
        t["peak"] = max(t["peak"], c["peak_memory_bytes"] or 0)
        t["budget"] = (c.get("budget") or {}).get("memory_bytes")
        t["methods"].add(c.get("method") or folder.config().method.name)
        t["devices"].add(c["client_id"])
    return {
        name: {"updates": t["updates"], "flops_per_update": t["flops"] / t["updates"],
               "upload_per_update": t["upload"] / t["updates"], "peak_memory": t["peak"],
               "budget_memory": t["budget"], "methods": sorted(t["methods"]),
               "devices_trained": len(t["devices"]),
               "within_budget": t["budget"] is None or t["peak"] <= t["budget"]}
        for name, t in out.items()
    }  # fmt: skip


def participation(run_dir: Path) -> dict[str, float]:
    """Shares of devices and of training examples that ever trained."""
    from fedfit.engine.runfolder import RunFolder

    folder = RunFolder(run_dir)
    summary = folder.summary()
    trained = {c["client_id"]: c["num_examples"] for c in folder.clients()
               if c["round"] > 0 and c.get("steps")}  # fmt: skip
    sizes = json.loads((run_dir / "shard_sizes.json").read_text())
    return {"devices": len(trained) / summary["num_clients"],
            "examples": sum(sizes[str(c)] for c in trained) / sum(sizes.values()),
            "eligible_devices": 1 - summary["excluded_clients"] / summary["num_clients"]}  # fmt: skip


def shard_sizes(run_dir: Path, sets: list[str]) -> None:
    """Every client's training examples, for the data share that trained."""
    from fedfit.config import load_config
    from fedfit.data import load_configured
    from fedfit.engine.setup import partition_clients

    config = load_config(EXAMPLE, sets)
    parts = partition_clients(config, load_configured(config.data, config.run.seed))
    sizes = {str(c): len(p) for c, p in enumerate(parts)}
    (run_dir / "shard_sizes.json").write_text(json.dumps(sizes))


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Every device takes part: a mixed federation against its methods alone", "",
             f"Command: `{result['command']}`", "", result["setting"], ""]  # fmt: skip
    for setting in SETTINGS:
        rows = [r for r in result["rows"] if r["setting"] == setting]
        if not rows:
            continue
        lines += [f"## {setting}", "",
                  "| method | lr | devices trained | data trained | round 0 | final | best | "
                  "gain | eval loss (prior) | learned |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            gain = r["final_accuracy"] - r["start_accuracy"]
            lr = "each its own" if r["method"] == "auto" else f"{r['lr']:g}"
            lines.append(
                f"| {r['method']} | {lr} | {pct(r['participation']['devices'])} | "
                f"{pct(r['participation']['examples'])} | {pct(r['start_accuracy'])} | "
                f"{pct(r['final_accuracy'])} | {pct(r['best_accuracy'])} | {100 * gain:+.1f} | "
                f"{r['final_loss']:.3f} ({r['prior_loss']:.3f}) | "
                f"{'yes' if learned(r) else 'no'} |"
            )
        lines += ["", "Per tier (training rounds): method, client updates, FLOPs and upload per "
                  "update, largest measured peak memory against the tier's budget.", "",
                  "| method | tier | trained with | updates | FLOPs / update | upload / update | "
                  "peak memory | budget | within |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            for tier, t in sorted(r["tiers"].items()):
                budget = "-" if t["budget_memory"] is None else format_bytes(t["budget_memory"])
                lines.append(
                    f"| {r['method']} | {tier} | {', '.join(t['methods'])} | {t['updates']} | "
                    f"{format_flops(t['flops_per_update'])} | "
                    f"{format_bytes(t['upload_per_update'])} | {format_bytes(t['peak_memory'])} "
                    f"| {budget} | {'yes' if t['within_budget'] else '**no**'} |"
                )
        lines += ["", "Accuracy by round:", "", "| method | " + " | ".join(
            f"r{p['round']}" for p in rows[0]["curve"]) + " |",
            "|---|" + "---|" * len(rows[0]["curve"])]  # fmt: skip
        for r in rows:
            lines.append(
                f"| {r['method']} | " + " | ".join(pct(p["accuracy"]) for p in r["curve"]) + " |"
            )
        lines.append("")
    if result.get("sweep"):
        lines += ["## Learning rates", "", "Each single method's client lr: a sweep of "
                  f"{SWEEP[0].split('=')[1]} rounds on the dirichlet setting, lowest final eval "
                  "loss wins; auto gives each candidate its method's winner, and head-bf16 "
                  "takes head's.", "", *sweep_table(result["sweep"]), ""]  # fmt: skip
        edges = [f"{m}: chosen lr {lr:g} is at the grid's edge"
                 for m, lr in result.get("chosen_lr", {}).items()
                 if m in LRS and at_edge(lr, LRS[m])]  # fmt: skip
        lines += [*(f"- {e}" for e in edges), ""] if edges else []
    lines += ["## Verdicts", "", *[f"- {c}" for c in result["claims"]], ""]
    return "\n".join(lines) + "\n"


def claims(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for setting in SETTINGS:
        mine = {r["method"]: r for r in rows if r["setting"] == setting}
        if "auto" not in mine or len(mine) < 2:
            continue
        auto = mine["auto"]
        singles = [r for m, r in mine.items() if m != "auto"]
        best = max(singles, key=lambda r: r["final_accuracy"])
        diff = auto["final_accuracy"] - best["final_accuracy"]
        out.append(
            f"{setting}: the mixed federation ends at {pct(auto['final_accuracy'])} with "
            f"{pct(auto['participation']['devices'])} of devices trained, against the best "
            f"single method ({best['method']}) at {pct(best['final_accuracy'])} with "
            f"{pct(best['participation']['devices'])}: {100 * diff:+.1f} points, "
            f"claim (at least the best single method) {'holds' if diff >= 0 else 'does not hold'}"
            f" at {auto['rounds']} rounds (one seed)"
        )
    return out


def plot(result: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, len(SETTINGS), sharey=True)
    for ax, setting in zip(axes, SETTINGS, strict=True):
        for r in (r for r in result["rows"] if r["setting"] == setting):
            ax.plot([p["round"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]],
                    "-" if r["method"] == "auto" else ":", marker=".", label=r["method"])  # fmt: skip
        ax.set(title=setting, xlabel="round (0 = the start)", ylabel="held-out accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_cells(
    ledger: Ledger, name: str, sizes: list[str], methods: list[str], quick: bool
) -> dict[str, float]:
    """Each single method's client lr from a short sweep on the dirichlet setting (lowest
    final eval loss); ``head-bf16`` takes ``head``'s. Returns method -> chosen lr."""
    chosen: dict[str, float] = {}
    points: list[dict[str, Any]] = []
    rounds = ["run.rounds=1", "run.eval_every=1"] if quick else SWEEP
    for method in sorted({"head" if m == "head-bf16" else m for m in methods} - {"auto"}):
        grid = LRS[method][1:2] if quick else LRS[method]

        def point(lr: float, eps: float | None, method: str = method) -> dict[str, Any]:
            cell = Cell(f"sweep-{method}-lr{lr:g}", method,
                        [*rounds, *method_sets(method), f"train.lr={lr}"],
                        {"setting": "sweep", "lr": lr, "stage": "sweep"})  # fmt: skip
            return run_cell(ledger, name, EXAMPLE, sizes, cell)

        mine, best = sweep(point, grid, [None])
        if best is None:
            raise SystemExit(f"{method}: every sweep point diverged (NaN loss)")
        chosen[method] = best["lr"]
        points += [{**q, "chosen": q is best} for q in mine]
    if "head" in chosen:
        chosen["head-bf16"] = chosen["head"]
    ledger.data["sweep"] = points
    ledger.data["chosen_lr"] = chosen
    ledger.save()
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-bert smoke test")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    name = "mixed_quick" if args.quick else "mixed"
    sizes = QUICK + FULL[-2:] if args.quick else FULL
    out = (Path("/tmp") if args.quick else RESULTS) / name
    ledger = Ledger(out.with_suffix(".json"), {"benchmark": name, "base": sizes})
    work = RUNS / name
    methods = list(args.methods)
    lrs = sweep_cells(ledger, name, sizes, list(METHODS if "auto" in methods else methods),
                      args.quick)  # fmt: skip
    rounds = QUICK_LONG if args.quick else LONG
    for setting in args.settings:
        for method in methods:
            extra = setting_sets(setting, sizes, work)
            lr = [] if method == "auto" else [f"train.lr={lrs[method]}"]
            cell = Cell(f"{setting}-{method}", method,
                        [*rounds, *extra, *method_sets(method, lrs), *lr],
                        {"setting": setting, "lr": lrs.get(method)})  # fmt: skip
            done = cell.key in ledger.cells
            figures = run_cell(ledger, name, EXAMPLE, sizes, cell)
            run_dir = Path(figures["run_dir"])
            if not done or "tiers" not in figures:
                shard_sizes(run_dir, [*sizes, *cell.overrides])
                figures["tiers"] = tiers_of(run_dir)
                figures["participation"] = participation(run_dir)
                ledger.cells[cell.key] = figures
                ledger.save()
            rows = [c for c in ledger.cells.values() if c.get("stage") != "sweep"]
            result = {**ledger.data, "rows": rows, "claims": claims(rows),
                      "setting": __doc__.split("\n\n")[2].replace("\n", " ")}  # fmt: skip
            write_outputs(result, out, markdown, plot)
            log(f"{cell.key}: final {pct(figures['final_accuracy'])}")


if __name__ == "__main__":
    main()
