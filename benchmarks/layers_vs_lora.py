"""Layer fine-tuning vs LoRA vs full FedAvg under device memory budgets, side by side.

    .venv/bin/python benchmarks/layers_vs_lora.py [--rounds 10] [--methods layers,lora,...]
    .venv/bin/python benchmarks/layers_vs_lora.py --quick      # smoke test, ~1-2 min on 2 cores

Checks the claim of Pfeiffer et al. (arXiv 2411.07826, docs/methods.md): "layer
fine-tuning beats LoRA at equal memory and FLOP budgets". Every run starts from
examples/default.toml (tweets, 100 clients, Dirichlet(0.5), 10 per round) and differs only in
the method and the device population: homogeneous memory budgets of 1/8, 1/4, 1/2 and 1x of
full fine-tuning memory (``devices.memory``), and the heterogeneous mix of those four tiers
(the [devices] table of examples/heterogeneous.toml). Methods: ``layers`` (deepest top-n that
fits), ``lora`` (r=8 of default.toml; a device fits it or is excluded), ``hetlora`` (only if
registered when the script runs) and ``fedavg`` (full fine-tuning, non-fitting devices
excluded). A setting where no device fits a method is a row "all devices excluded", not a
crash. Client learning rates are per method (``--lr``): default.toml's 3e-3 is tuned for
LoRA adapters and is far too high for AdamW on whole pretrained blocks.

Per (setting, method): final accuracy, majority baseline, devices excluded, mean trained depth
or rank (clients.jsonl "trained"), measured per-client peak memory (max over all updates) and
FLOPs per round (mean), upload per client per round, wall time of the run. Writes
``--out``.json / .md / .png (accuracy vs budget per method); the JSON is rewritten after every
run so a stopped benchmark keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import tempfile
import time
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedfit.algorithms import ALGORITHMS
from fedfit.config import Config, apply_overrides, from_dict
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.log import log
from fedfit.units import format_bytes, format_duration, format_flops

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TOML = ROOT / "examples" / "default.toml"
HETEROGENEOUS_TOML = ROOT / "examples" / "heterogeneous.toml"
METHODS = ("layers", "lora", "hetlora", "fedavg")
BUDGETS = ("1/8x", "1/4x", "1/2x", "1x", "het")
# AdamW client lr per method. LoRA's is default.toml's (tuned for adapters); methods that
# train whole pretrained blocks use a fine-tuning lr, the same for both so layers and fedavg
# differ only in what they train.
LRS = {"lora": 3e-3, "hetlora": 3e-3, "layers": 1e-4, "fedavg": 1e-4}
FULL = {"rounds": 10, "local_steps": 4, "eval_examples": 500, "model": "minilm-l6"}
QUICK = {"rounds": 2, "local_steps": 2, "eval_examples": 100, "model": "tiny-bert"}
QUICK_DATA = {"num_clients": 12, "clients_per_round": 3}
NO_FIT = "no device of the population fits"


def _toml(value: Any) -> str:
    # JSON strings, numbers and lists of them are valid TOML values.
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def heterogeneous_devices() -> dict[str, Any]:
    """The [devices] table of examples/heterogeneous.toml (the four memory tiers)."""
    return dict(tomllib.loads(HETEROGENEOUS_TOML.read_text())["devices"])


def setting_overrides(budget: str) -> list[str]:
    """``--set`` overrides for one budget setting: a homogeneous memory fraction, or "het"."""
    if budget == "het":
        return [f"devices.{k}={_toml(v)}" for k, v in heterogeneous_devices().items()]
    return ["devices.population=homogeneous", f"devices.memory={budget}"]


def method_table(method: str, base: dict[str, Any]) -> dict[str, Any]:
    """default.toml's [method] options that this method accepts (LoRA's r and alpha carry
    over to hetlora; layers and fedavg take none of them)."""
    accepted = {f.name for f in fields(ALGORITHMS[method].options)}
    return {"name": method, **{k: v for k, v in base.items() if k in accepted}}


def make_config(
    method: str, budget: str, args: argparse.Namespace, lr: float
) -> tuple[Config, list[str]]:
    """The run's config: default.toml, this method, this budget, the benchmark's sizes."""
    raw = tomllib.loads(DEFAULT_TOML.read_text())
    raw["method"] = method_table(method, raw.get("method", {}))
    overrides = [
        f"run.name={run_name(budget, method)}",
        f"run.output_dir={_toml(str(args.runs_dir))}",
        f"run.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"train.lr={lr}",
        f"data.eval_examples={args.eval_examples}",
        f"model.name={args.model}",
        *setting_overrides(budget),
    ]
    if args.quick:
        overrides += [f"data.{k}={v}" for k, v in QUICK_DATA.items()]
    return from_dict(apply_overrides(raw, overrides)), overrides


def run_name(budget: str, method: str) -> str:
    return f"{'het' if budget == 'het' else 'mem-' + budget.replace('/', '_')}-{method}"


def trained_stats(clients: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean trained depth (blocks) and LoRA rank over every client update, parsed from the
    "trained" field ("top 3 blocks + head", "LoRA r=8 + head", "full model", "head only")."""
    depths: list[int] = []
    ranks: list[int] = []
    kinds: set[str] = set()
    for c in clients:
        text = c.get("trained") or ""
        if m := re.search(r"top (\d+) blocks", text):
            depths.append(int(m.group(1)))
            kinds.add("layers")
        elif m := re.search(r"\br=(\d+)", text):
            ranks.append(int(m.group(1)))
            kinds.add("lora")
        elif text == "head only":
            depths.append(0)
            kinds.add("layers")
        elif text:
            kinds.add(text)
    return {
        "mean_depth": sum(depths) / len(depths) if depths else None,
        "depths": sorted(set(depths)),
        "mean_rank": sum(ranks) / len(ranks) if ranks else None,
        "ranks": sorted(set(ranks)),
        "kinds": sorted(kinds),
    }


def measure_run(method: str, budget: str, args: argparse.Namespace) -> dict[str, Any]:
    """One federated run; a population where nobody fits becomes an "excluded" row."""
    lr = args.lrs[method]
    config, overrides = make_config(method, budget, args, lr)
    row: dict[str, Any] = {"budget": budget, "method": method, "lr": lr, "overrides": overrides}
    t0 = time.perf_counter()

    def progress(round_: int, total: int, evaluation: dict[str, Any] | None) -> None:
        acc = f", accuracy {evaluation['accuracy']:.3f}" if evaluation else ""
        log(f"    round {round_}/{total}{acc} ({time.perf_counter() - t0:.0f} s)")

    try:
        run_dir = run(config, overwrite=True, progress=progress, plots=False)
    except ValueError as err:
        if NO_FIT not in str(err):
            raise
        return {**row, "status": "all devices excluded", "reason": str(err)}
    folder = RunFolder(run_dir)
    summary, clients = folder.summary(), folder.clients()
    rounds = max(summary["rounds_completed"], 1)
    per_client = summary["per_client"]
    return {
        **row,
        "status": "ok",
        "run_dir": str(run_dir),
        "final_accuracy": summary["final"]["accuracy"],
        "majority_baseline": summary["majority_baseline"],
        "num_clients": summary["num_clients"],
        "excluded_clients": summary["excluded_clients"],
        "excluded_reasons": sorted(set(summary["excluded"].values())),
        **trained_stats(clients),
        "peak_memory_bytes_max": per_client["peak_memory_bytes_max"],
        "flops_per_round_mean": per_client["flops_mean"],
        "upload_bytes_per_client_mean": per_client["upload_bytes_mean"],
        "upload_bytes_per_round": summary["cum_upload_bytes"] / rounds,
        "budget_memory_bytes": sorted(
            {c["budget"]["memory_bytes"] for c in clients if c.get("budget")}
        ),
        "run_wall_s": summary["wall_s"],
        "process_wall_s": round(time.perf_counter() - t0, 2),
    }


def _eval_se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` examples."""
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def verdict(rows: list[dict[str, Any]], eval_examples: int) -> str:
    """One line, computed from the rows: does ``layers`` beat ``lora`` at equal budgets?

    A difference counts only beyond two standard errors of the difference of two accuracies on
    the same ``eval_examples`` held-out examples (treated as independent: conservative)."""
    by = {(r["budget"], r["method"]): r for r in rows}
    wins: list[str] = []
    ties: list[str] = []
    losses: list[str] = []
    only_layers: list[str] = []
    only_lora: list[str] = []
    neither: list[str] = []
    flop_ratios: list[float] = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        layers, lora = by.get((budget, "layers")), by.get((budget, "lora"))
        if layers is None or lora is None:
            continue
        ok_layers, ok_lora = layers["status"] == "ok", lora["status"] == "ok"
        if not ok_layers and not ok_lora:
            neither.append(budget)
        elif not ok_lora:
            only_layers.append(budget)
        elif not ok_layers:
            only_lora.append(budget)
        else:
            a, b = layers["final_accuracy"], lora["final_accuracy"]
            se = math.hypot(_eval_se(a, eval_examples), _eval_se(b, eval_examples))
            (wins if a - b > 2 * se else losses if b - a > 2 * se else ties).append(
                f"{budget}: {100 * (a - b):+.1f} pts"
            )
            flop_ratios.append(layers["flops_per_round_mean"] / lora["flops_per_round_mean"])
    if not (wins or ties or losses or only_layers or only_lora):
        return "Verdict: no budget setting ran both layers and lora; the claim is untested."

    def listed(items: list[str]) -> str:
        return f" ({'; '.join(items)})" if items else ""

    parts = [
        f"where both trained (layers minus LoRA accuracy), layers won {len(wins)}{listed(wins)}, "
        f"tied within 2 s.e. {len(ties)}{listed(ties)} and lost {len(losses)}{listed(losses)} "
        f"of {len(wins) + len(ties) + len(losses)} settings"
    ]
    if flop_ratios:
        lo, hi = min(flop_ratios), max(flop_ratios)
        span = f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"
        parts.append(f"layers used {span} LoRA's measured FLOPs per client per round there")
    if only_layers:
        parts.append(f"only layers could train at {', '.join(only_layers)} (LoRA fit no device)")
    if only_lora:
        parts.append(f"only LoRA could train at {', '.join(only_lora)}")
    if neither:
        parts.append(f"neither fit any device at {', '.join(neither)}")
    supported = not losses and (wins or only_layers)
    head = "supported" if supported else "not supported" if losses else "not shown"
    return f"Verdict: claim {head} here: " + "; ".join(parts) + "."


def _trained_cell(r: dict[str, Any]) -> str:
    if r.get("mean_depth") is not None:
        span = r["depths"]
        spread = f" ({span[0]}-{span[-1]})" if len(span) > 1 else ""
        return f"depth {r['mean_depth']:.2f}{spread}"
    if r.get("mean_rank") is not None:
        span = r["ranks"]
        spread = f" ({span[0]}-{span[-1]})" if len(span) > 1 else ""
        return f"rank {r['mean_rank']:.2f}{spread}"
    return ", ".join(r.get("kinds", [])) or "-"


def _budget_label(budget: str) -> str:
    return "het (1/8, 1/4, 1/2, 1x tiers)" if budget == "het" else f"{budget} (homog.)"


def markdown(result: dict[str, Any]) -> str:
    rows, args = result["rows"], result["args"]
    majority = next((r["majority_baseline"] for r in rows if r["status"] == "ok"), None)
    out = [
        f"# Layer fine-tuning vs LoRA under memory budgets: {args['model']}, tweets",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{args['num_clients']} clients, Dirichlet(0.5), {args['clients_per_round']} per round, "
        f"{args['rounds']} rounds x {args['local_steps']} local steps of batch 16 x 64 tokens; "
        f"accuracy on {args['eval_examples']} held-out tweets (majority class "
        f"{'n/a' if majority is None else f'{100 * majority:.1f}%'}). Budgets are peak "
        "training memory as a fraction of full fine-tuning's; het = examples/heterogeneous.toml "
        "(a quarter of the devices in each tier). Client AdamW lr per method: "
        + ", ".join(f"{m} {args['lrs'][m]:g}" for m in args["methods"])
        + ". Peak memory is the max over every client update, FLOPs and upload are per client "
        "per round (mean), all measured.",
        "",
        'Claim (docs/methods.md, Pfeiffer et al.): "layer fine-tuning beats LoRA at equal '
        'memory and FLOP budgets".',
        "",
        result["verdict"],
        "",
    ]
    out += [f"Note: {n}" for n in result["notes"]]
    out += [
        "",
        "| budget | method | final acc. | excluded | trained (mean) | peak memory (max) "
        "| FLOPs / round | upload / round | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = _budget_label(r["budget"])
        if r["status"] != "ok":
            out.append(
                f"| {label} | {r['method']} | - | all devices excluded "
                f"({r['reason'].replace('|', '/')}) | - | - | - | - | - |"
            )
            continue
        out.append(
            f"| {label} | {r['method']} | {100 * r['final_accuracy']:.1f}% | "
            f"{r['excluded_clients']}/{r['num_clients']} | {_trained_cell(r)} | "
            f"{format_bytes(r['peak_memory_bytes_max'])} | "
            f"{format_flops(r['flops_per_round_mean'])} | "
            f"{format_bytes(r['upload_bytes_per_client_mean'])} | "
            f"{format_duration(r['run_wall_s'])} |"
        )
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any]) -> Figure:
    """Final accuracy vs budget, one line per method over the homogeneous budgets and the
    heterogeneous mix as its own x position; a setting where every device was excluded is an
    open marker on the bottom edge."""
    rows, budgets = result["rows"], result["args"]["budgets"]
    xs = {b: i for i, b in enumerate(budgets)}
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    oks = [r["final_accuracy"] for r in rows if r["status"] == "ok"]
    majority = next((r["majority_baseline"] for r in rows if r["status"] == "ok"), None)
    low = min([*oks, majority or 1.0, 1.0]) - 0.05
    bottom = max(0.0, low - 0.03)
    markers = dict(zip(METHODS, "osD^", strict=True))
    for i, method in enumerate(result["args"]["methods"]):
        color = f"C{i}"
        # Methods side by side at each x, so equal accuracies do not hide each other.
        dodge = (i - (len(result["args"]["methods"]) - 1) / 2) * 0.06
        mine = [r for r in rows if r["method"] == method]
        label: str | None = method
        # The homogeneous budgets form a line; the heterogeneous mix is a lone point.
        for group in (
            [r for r in mine if r["budget"] != "het" and r["status"] == "ok"],
            [r for r in mine if r["budget"] == "het" and r["status"] == "ok"],
        ):
            if not group:
                continue
            ax.plot(
                [xs[r["budget"]] + dodge for r in group],
                [r["final_accuracy"] for r in group],
                marker=markers.get(method, "o"),
                color=color,
                label=label,
            )
            label = None
        excluded = [r for r in mine if r["status"] != "ok"]
        ax.plot(
            [xs[r["budget"]] + dodge for r in excluded],
            [bottom + 0.005] * len(excluded),
            marker="x",
            color=color,
            linestyle="none",
        )
    if majority is not None:
        ax.axhline(majority, color="grey", linestyle=":", label="majority class")
    if "het" in xs:
        ax.axvline(xs["het"] - 0.5, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs.values()), [b if b != "het" else "het mix" for b in budgets])
    ax.set_xlim(-0.5, len(budgets) - 0.5)
    ax.set_ylim(bottom=bottom)
    ax.set_xlabel("device memory budget (fraction of full fine-tuning peak memory)")
    ax.set_ylabel("final accuracy")
    ax.set_title(
        f"{result['args']['model']}, tweets: x on the bottom edge = all devices excluded",
        fontsize=9,
    )
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    return fig


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result).savefig(out.with_suffix(".png"), dpi=120)


def parse_lrs(text: str) -> dict[str, float]:
    """ "layers=1e-4,lora=3e-3" (or "all=1e-3") onto the per-method defaults."""
    lrs = dict(LRS)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        for m in METHODS if name.strip() == "all" else [name.strip()]:
            lrs[m] = float(value)
    return lrs


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help=f"default {FULL['rounds']}")
    parser.add_argument("--local-steps", type=int, help=f"default {FULL['local_steps']}")
    parser.add_argument("--eval-examples", type=int, help=f"default {FULL['eval_examples']}")
    parser.add_argument("--model", help=f"default {FULL['model']}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default=",".join(BUDGETS), help="memory fractions and het")
    parser.add_argument("--lr", default="", help="per-method client lr, e.g. layers=2e-4,all=1e-3")
    parser.add_argument("--out", help="output stem (default benchmarks/results/layers_vs_lora)")
    parser.add_argument("--runs-dir", help="where the run folders go (default: a temp folder)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: tiny-bert, 12 clients, 3/round, 2 rounds"
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed {', '.join(METHODS)}")
    args.lrs = parse_lrs(args.lr)
    args.runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedfit-layers-vs-lora-"))
    if args.out is None:
        # A smoke test never overwrites the committed results.
        stem = "layers_vs_lora_quick" if args.quick else "layers_vs_lora"
        args.out = str((args.runs_dir if args.quick else RESULTS) / stem)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/layers_vs_lora.py", *argv])
    notes = []
    for m in [m for m in args.methods if m not in ALGORITHMS]:
        notes.append(f"{m} is not registered in fedfit.algorithms.ALGORITHMS: skipped.")
        log(notes[-1])
    methods = [m for m in args.methods if m in ALGORITHMS]
    if "hetlora" in methods:
        notes.append(
            "hetlora was registered in fedfit.algorithms.ALGORITHMS at run time: included."
        )
    data = QUICK_DATA if args.quick else {"num_clients": 100, "clients_per_round": 10}
    result: dict[str, Any] = {
        "command": command,
        "args": {
            **{k: getattr(args, k) for k in ("rounds", "local_steps", "eval_examples", "model")},
            **data,
            "methods": methods,
            "requested_methods": args.methods,
            "budgets": args.budgets,
            "lrs": {m: args.lrs[m] for m in methods},
            "runs_dir": str(args.runs_dir),
        },
        "notes": notes,
        "rows": [],
        "verdict": "",
    }
    out = Path(args.out)
    total = len(methods) * len(args.budgets)
    t_start = time.perf_counter()
    log(f"runs in {args.runs_dir}; results to {out}.md/.json/.png")
    for budget in args.budgets:
        for method in methods:
            n = len(result["rows"]) + 1
            log(
                f"[{n}/{total}] {method} at {budget} "
                f"(elapsed {format_duration(time.perf_counter() - t_start)})"
            )
            row = measure_run(method, budget, args)
            log(
                f"[{n}/{total}] {method} at {budget}: "
                + (
                    f"accuracy {row['final_accuracy']:.3f}, {row['excluded_clients']} excluded, "
                    f"{format_duration(row['process_wall_s'])}"
                    if row["status"] == "ok"
                    else row["reason"]
                )
            )
            result["rows"].append(row)
            result["verdict"] = verdict(result["rows"], args.eval_examples)
            result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            write(result, out)
    log(f"done in {format_duration(time.perf_counter() - t_start)}")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
