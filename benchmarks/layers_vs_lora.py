"""Layer fine-tuning vs LoRA vs full fine-tuning under device memory budgets, at convergence.

    .venv/bin/python benchmarks/layers_vs_lora.py            # sweep, then every cell (resumable)
    .venv/bin/python benchmarks/layers_vs_lora.py --quick    # tiny-bert smoke test, ~3 min
    .venv/bin/python benchmarks/layers_vs_lora.py --probe --seeds 2   # + lr probe, seed 1

Checks the claim of Pfeiffer et al. (arXiv 2411.07826, docs/methods.md): "layer fine-tuning
beats LoRA at equal memory and FLOP budgets, and is on par with it under tight upload budgets".

Task: examples/default.toml (tweets, 3 classes, 100 clients, Dirichlet(0.5), 10 per round, 4
local AdamW steps of batch 16 x 64 tokens), every run from the same task-aligned start (the
federated class-mean head of 10 clients, ``model.head_init = "ncm"``), ``run.lanes = 2`` and
length-bucketed batches for speed.

Budgets (the device's peak training memory) are fractions of minilm-l6's full fine-tuning
peak, written into the config in bytes, so that minilm-l3 (3 blocks, the paper's "smaller
model" choice) runs under the very same devices: 1/8x, 1/4x, 1/2x, 1x homogeneous, ``het``
(examples/heterogeneous.toml's four tiers, a quarter of the devices each) and ``upload``
(memory 1x, upload per round at most LoRA r=8's predicted upload: the tight upload budget).

Methods: ``layers`` (deepest top-n that fits the device), ``lora`` (r = 8, alpha 16; a device
fits it or is excluded), ``fedavg`` (full fine-tuning; non-fitting devices excluded) and
``cocofl`` (layers over a bfloat16 frozen prefix) and ``slt`` (successive layer training: six
stages of 5 rounds up the blocks, the blocks above the stage's one narrowed to the widest
width that fits the device). Client lr of layers and lora from a sweep
(``LRS``) of ``SWEEP`` rounds at 1x on minilm-l6, chosen by the lowest final eval loss;
fedavg, cocofl and slt take layers' winner (``LR_OF``); the long runs (``LONG``) use them on both
models. The cells run are ``CELLS`` (``--all``: every budget x model x method). A cell where
no device fits is a row with the planner's reason, not a run.

The ledger benchmarks/results/layers_vs_lora.json keeps every finished cell and each cell is
a resumable run folder under runs/bench/layers_vs_lora: a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from cells import RUNS, Cell, Ledger, at_edge, pct, pick, run_cell
from common import DEFAULT_TOML, RESULTS, ROOT, log
from matplotlib.figure import Figure

from fedfit.algorithms import ALGORITHMS
from fedfit.units import format_bytes, format_flops

NAME = "layers_vs_lora"
HETEROGENEOUS = ROOT / "examples" / "heterogeneous.toml"
METHODS = ("layers", "lora", "fedavg", "cocofl", "slt")
MODELS = ("minilm-l6", "minilm-l3")
# cells in order of importance: a stopped run has the headline settings first
BUDGETS = ("1x", "het", "1/2x", "upload", "1/4x", "1/8x")
FRACTIONS = {"1/8x": 1 / 8, "1/4x": 1 / 4, "1/2x": 1 / 2, "1x": 1.0}
TIERS = {"eighth": 1 / 8, "quarter": 1 / 4, "half": 1 / 2, "full": 1.0}
LRS = {"layers": (1e-5, 3e-5, 1e-4), "lora": (3e-4, 1e-3, 3e-3)}
# methods that update whole pretrained blocks as layers does take its winner: fedavg (every
# block), cocofl (layers over a bfloat16 prefix) and slt (successive layer training: whole
# blocks too, one trained in full per stage)
LR_OF = {"fedavg": "layers", "cocofl": "layers", "slt": "layers"}
# the cells run by default, most telling first: (budget, model, methods). 1x: every method
# fits minilm-l6; het: the four tiers; 1/2x and 1/4x: where minilm-l6's LoRA and layers stop
# fitting, minilm-l3 (the smaller model) and cocofl (the low-precision prefix) are the ways
# in; upload and 1/8x: mostly nobody fits (planner rows, no training). --all: the product.
CELLS = (
    ("1x", "minilm-l6", ("layers", "lora", "fedavg", "slt")),
    ("het", "minilm-l6", ("layers", "lora", "cocofl", "slt")),
    ("1/2x", "minilm-l6", ("layers", "cocofl", "lora", "slt")),
    ("1/2x", "minilm-l3", ("lora", "layers")),
    ("1/4x", "minilm-l6", ("cocofl", "layers", "slt")),
    ("1/4x", "minilm-l3", ("layers", "lora", "cocofl")),
    ("upload", "minilm-l6", ("layers", "lora")),
    ("1/8x", "minilm-l6", ("cocofl",)),
    ("1/8x", "minilm-l3", ("cocofl", "layers")),
)
METHOD_SETS = {
    "layers": ["method.name=layers"],
    "lora": ["method.name=lora", "method.r=8", "method.alpha=16.0"],
    "fedavg": ["method.name=fedavg"],
    "cocofl": ["method.name=cocofl"],
    "slt": ["method.name=slt"],
}
COMMON = [
    "data.eval_examples=500",
    "run.lanes=2",
    "train.bucket_by_length=true",
    "model.head_init=ncm",
    "model.head_init_clients=10",
]
# --probe: a winner at the top edge of its grid gets one sweep point past it, reported beside
# the grid; the long runs keep the grid's winner (a changed lr would mean rerunning them all)
PROBE = {"layers": 3e-4, "lora": 1e-2}
# --seeds K: these cells again with run.seed = 1 .. K-1 (partition, sampling and init change)
REPLICATE_CELLS = (
    ("1x", "minilm-l6", ("layers", "lora")),
    ("het", "minilm-l6", ("layers", "lora")),
)
SWEEP = ["run.rounds=10", "run.eval_every=10"]
LONG = ["run.rounds=30", "run.eval_every=5"]
QUICK = ["model.max_length=32", "data.num_clients=12", "data.clients_per_round=3",
         "data.eval_examples=60", "train.local_steps=2", "data.min_examples=5",
         "model.head_init_clients=4"]  # fmt: skip
QUICK_SWEEP = ["run.rounds=1", "run.eval_every=1"]
QUICK_LONG = ["run.rounds=2", "run.eval_every=1"]
QUICK_MODELS = {"minilm-l6": "tiny-bert", "minilm-l3": "tiny-bert"}
NO_FIT = "no device of the population fits"


def references(
    common: list[str], model: str, task: str = "classification", num_labels: int = 3
) -> dict[str, int]:
    """What full fine-tuning of ``model`` needs (the planner's reference, margin included),
    and LoRA r=8's predicted upload per round: the amounts the budgets are fractions of. The
    engine's own cost context of the benchmark's config (batch and length; the number of
    steps, which sets only FLOPs, from one full batch)."""
    from transformers import BertConfig, LlamaConfig

    from fedfit.config import load_config
    from fedfit.costs.spec import TrainSpec
    from fedfit.engine.setup import cost_context_for
    from fedfit.models import configs

    arch = {"minilm-l6": BertConfig(**configs.MINILM_L6),
            "tiny-bert": BertConfig(**configs.TINY_BERT),
            "smollm2-19m": LlamaConfig(**configs.SMOLLM2_19M),
            "tiny-llama": LlamaConfig(**configs.TINY_LLAMA)}[model]  # fmt: skip
    config = load_config(DEFAULT_TOML, [*common, f"model.name={model}"])
    ctx = cost_context_for(config, arch, task, num_labels, config.train.batch_size)
    lora = ctx.estimate(TrainSpec("lora", lora_rank=8, optimizer=ctx.optimizer))
    return {"memory": ctx.reference().memory_bytes, "lora_upload": lora.upload_bytes}


def budget_sets(budget: str, ref: dict[str, int]) -> list[str]:
    """``--set`` strings of one budget setting, in bytes (see the module docstring)."""
    if budget in FRACTIONS:
        memory = math.floor(FRACTIONS[budget] * ref["memory"])
        return ["devices.population=homogeneous", f"devices.memory={memory}B"]
    if budget == "upload":
        return ["devices.population=homogeneous", f"devices.memory={ref['memory']}B",
                f"devices.upload={ref['lora_upload']}B"]  # fmt: skip
    tiers = [f"{name} share=0.25 memory={math.floor(f * ref['memory'])}B"
             for name, f in TIERS.items()]  # fmt: skip
    return ["devices.population=tiers", f"devices.tiers={json.dumps(tiers)}"]


def budget_label(budget: str, ref: dict[str, int]) -> str:
    """The budget in human units, as the table shows it."""
    if budget in FRACTIONS:
        return f"memory {format_bytes(math.floor(FRACTIONS[budget] * ref['memory']))}"
    if budget == "upload":
        return f"memory {format_bytes(ref['memory'])}, upload {format_bytes(ref['lora_upload'])}"
    return "tiers " + " / ".join(
        format_bytes(math.floor(f * ref["memory"])) for f in TIERS.values()
    )


def cell_key(stage: str, model: str, budget: str, method: str, lr: float) -> str:
    return f"{stage}-{model}-{budget.replace('/', '_')}-{method}-lr{lr:g}"


def run_or_exclude(
    ledger: Ledger, common: list[str], cell: Cell, name: str = NAME
) -> dict[str, Any]:
    """The cell's figures, or a row naming why no device fits (kept in the ledger too)."""
    if cell.key in ledger.cells:
        return ledger.cells[cell.key]
    try:
        return run_cell(ledger, name, DEFAULT_TOML, common, cell)
    except ValueError as err:
        if NO_FIT not in str(err):
            raise
        row = {"key": cell.key, "method": cell.method, **cell.info, "excluded_all": str(err)}
        ledger.cells[cell.key] = row
        ledger.save()
        log(f"  {cell.key}: {err}")
        return row


NAMES = {"layers": "layers", "lora": "LoRA", "fedavg": "FedAvg", "cocofl": "CoCoFL",
         "slt": "SLT"}  # fmt: skip
# the pairs the verdict compares: the claim (layers against LoRA), then layers against the
# paper's other baselines
PAIRS = (("layers", "lora"), ("layers", "slt"), ("layers", "cocofl"))


def verdict(rows: list[dict[str, Any]], eval_examples: int) -> list[str]:
    """Layers against LoRA (and against SLT and CoCoFL) in every (model, budget) where both
    have a row, beyond 2 standard errors of a difference of two accuracies on
    ``eval_examples`` examples."""
    by = {(r["model"], r["budget"], r["method"]): r for r in rows}
    lines = []
    for x, y in PAIRS:
        for model in MODELS:
            for budget in BUDGETS:
                a, b = by.get((model, budget, x)), by.get((model, budget, y))
                if a and b:
                    lines.append(compare(a, b, x, y, f"{model} at {budget}", eval_examples))
    return lines


def compare(
    a: dict[str, Any], b: dict[str, Any], x: str, y: str, where: str, eval_examples: int
) -> str:
    """One verdict line: method ``x``'s row ``a`` against ``y``'s row ``b``."""
    nx, ny = NAMES[x], NAMES[y]
    excluded = exclusion_line(a, b, nx, ny, where)
    if excluded is None:
        pa, pb = a["final_accuracy"], b["final_accuracy"]
        se = math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / eval_examples)
        word = "wins" if pa - pb > 2 * se else "loses" if pb - pa > 2 * se else "ties"
        flops = a["flops_per_client_round"] / b["flops_per_client_round"]
        return (
            f"{where}: {nx} {word} against {ny} ({pct(pa)} vs {pct(pb)}, "
            f"{100 * (pa - pb):+.1f} pts, 2 s.e. {200 * se:.1f}; FLOPs per client round "
            f"{flops:.2f}x {ny}'s)"
        )
    return excluded


def exclusion_line(
    a: dict[str, Any], b: dict[str, Any], nx: str, ny: str, where: str
) -> str | None:
    """The verdict line when method ``nx``'s row ``a`` or ``ny``'s row ``b`` trained no
    device; None when both trained (the caller compares them)."""
    ran_a, ran_b = "excluded_all" not in a, "excluded_all" not in b
    if ran_a and ran_b:
        return None
    if ran_a:
        return f"{where}: only {nx} fits a device ({ny}: all excluded)"
    if ran_b:
        return f"{where}: only {ny} fits a device ({nx}: all excluded)"
    return f"{where}: neither {nx} nor {ny} fits any device"


def flattened(row: dict[str, Any]) -> str:
    """Gain over the last 10 rounds of a long run (curve points every 5 rounds)."""
    curve = row.get("curve") or []
    if len(curve) < 3:
        return "-"
    return f"{100 * (curve[-1]['accuracy'] - curve[-3]['accuracy']):+.1f}"


def markdown(result: dict[str, Any]) -> str:
    out = [
        "# Layer fine-tuning vs LoRA vs full fine-tuning under memory budgets, at convergence",
        "",
        f"Command: `{result['command']}`",
        "",
        result["setting"],
        "",
        "Claim (Pfeiffer et al.): layer fine-tuning beats LoRA at equal memory and FLOP "
        "budgets, and is on par with it under tight upload budgets.",
        "",
        "Verdict, cell by cell (final accuracy after the long run):",
        "",
        *[f"- {line}" for line in result["verdict"]],
        "",
        *[f"Note: {n}" for n in result["notes"]],
        "",
        "Chosen client lr (sweep at 1x on minilm-l6, lowest final eval loss): "
        + ", ".join(
            f"{m} {lr:g}" + (" (grid edge)" if m in result["edge"] else "")
            for m, lr in result["lrs"].items()
        ),  # fmt: skip
        "",
        "| model | budget | method | round 0 | final | best | last 10 rounds | devices "
        "trained | depth / rank | peak memory (max) | budget | FLOPs / client / round | "
        "upload / client / round | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head = f"| {r['model']} | {r['budget']} | {r['method']} |"
        if "excluded_all" in r:
            reason = r["excluded_all"].split(": ", 1)[-1]
            out.append(f"{head} - | - | - | - | 0% | - | - | - | - | - | all excluded: {reason} |")
            continue
        out.append(
            f"{head} {pct(r['start_accuracy'])} | {pct(r['final_accuracy'])} | "
            f"{pct(r['best_accuracy'])} | {flattened(r)} | {pct(r.get('trained_share'))} | "
            f"{r.get('trained', '-')} | {format_bytes(r['peak_memory_bytes_max'])} | "
            f"{r['budget_text']} | {format_flops(r['flops_per_client_round'])} | "
            f"{format_bytes(r['upload_bytes_per_client'])} | {r['cell_wall_s'] / 60:.1f} min |"
        )
    if result.get("replicates"):
        out += ["", "Other seeds (`--seeds`; the same cell with another run.seed):", "",
                "| model | budget | method | seed | round 0 | final | best |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["replicates"]:
            out.append(
                f"| {r['model']} | {r['budget']} | {r['method']} | {r['seed']} | "
                f"{pct(r['start_accuracy'])} | {pct(r['final_accuracy'])} | "
                f"{pct(r['best_accuracy'])} |"
            )
        out += ["", *[f"- {line}" for line in result.get("replicate_verdict", [])]]
    out += ["", "Sweep (final eval loss / accuracy after the sweep rounds; * = chosen; "
            "probe = one point past the grid's edge, `--probe`, not used by the long runs):",
            "",
            "| method | lr | eval loss | accuracy |", "|---|---|---|---|"]  # fmt: skip
    for p in result["sweep"]:
        loss = "-" if p.get("final_loss") is None else f"{p['final_loss']:.3f}"
        acc = pct(p.get("final_accuracy"))
        mark = "*" if p.get("chosen") else " (probe)" if p.get("probe") else ""
        out.append(f"| {p['method']}{mark} | {p['lr']:g} | {loss} | {acc} |")
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any]) -> Figure:
    """Accuracy by round (from round 0) per cell that ran, one panel per model."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = dict(zip(MODELS, fig.subplots(1, len(MODELS)), strict=True))
    styles = {"1x": "-", "het": "--", "1/2x": ":", "1/4x": "-.", "upload": (0, (1, 3)),
              "1/8x": (0, (5, 5))}  # fmt: skip
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for r in result["rows"]:
        if "excluded_all" in r or not r.get("curve"):
            continue
        ax = axes[r["model"]]
        ax.plot([p["round"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]],
                linestyle=styles[r["budget"]], color=colours[r["method"]], marker=".",
                label=f"{r['method']} {r['budget']}")  # fmt: skip
    for model, ax in axes.items():
        ax.set(title=model, xlabel="round (0 = the class-mean start)", ylabel="accuracy")
        ax.legend(fontsize=7)
    return fig


def add_trained(ledger: Ledger, row: dict[str, Any]) -> None:
    """``row["trained_share"]`` and ``row["trained"]`` (see ``trained_summary``), also kept in
    the row's ledger cell: from the cell, else its run folder, else the ledger file's earlier
    rows (a fresh checkout has the ledger but not the run folders)."""
    from fedfit.engine.runfolder import RunFolder

    cell = ledger.cells.get(row["key"], {})
    if "trained_share" not in cell:
        if RunFolder(Path(row["run_dir"])).has_summary():
            cell["trained_share"], cell["trained"] = trained_summary(row["run_dir"])
        else:
            earlier = {r.get("key"): r for r in ledger.earlier_rows}.get(row["key"], {})
            if "trained_share" not in earlier:
                raise FileNotFoundError(
                    f"{row['run_dir']}: no finished run folder, and the ledger has no devices "
                    "trained for this cell (rerun it: delete its ledger entry)"
                )
            cell["trained_share"], cell["trained"] = earlier["trained_share"], earlier["trained"]
        ledger.save()
    row["trained_share"], row["trained"] = cell["trained_share"], cell["trained"]


def trained_summary(run_dir: str) -> tuple[float | None, str]:
    """Share of the population that ever trained, and the depth / rank trained."""
    from fedfit.engine.runfolder import RunFolder

    folder = RunFolder(Path(run_dir))
    clients = folder.clients()
    summary = folder.summary()
    kinds = sorted({c.get("trained", "") for c in clients if c.get("round", 0) > 0})
    share = 1 - summary["excluded_clients"] / summary["num_clients"]
    return share, "; ".join(kinds)[:80]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny-bert smoke test")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="default: every registered one of " + ", ".join(METHODS))  # fmt: skip
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--budgets", nargs="+", choices=BUDGETS, default=list(BUDGETS))
    p.add_argument("--all", action="store_true", help="every budget x model x method")
    p.add_argument(
        "--probe",
        action="store_true",
        help="one sweep point past a winner at the grid's top edge (reported only)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run REPLICATE_CELLS with run.seed 1 .. SEEDS-1 too (default 1: none)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = [m for m in METHODS if m in ALGORITHMS]
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    name = NAME + ("-quick" if args.quick else "")
    out = args.out or (Path("/tmp") / name if args.quick else RESULTS / name)
    common = COMMON + (QUICK if args.quick else [])
    sweep_sets, long_sets = (QUICK_SWEEP, QUICK_LONG) if args.quick else (SWEEP, LONG)
    command = shlex.join([".venv/bin/python", "benchmarks/layers_vs_lora.py", *argv])
    setting = (
        "tweets, 100 clients (Dirichlet 0.5), 10 per round, 4 local AdamW steps of 16 x 64 "
        "tokens, class-mean head start; budgets are fractions of minilm-l6's full "
        "fine-tuning peak memory (margin included), in bytes for both models; accuracy on "
        "500 held-out tweets; long runs 30 rounds, evaluated every 5."
    )
    ledger = Ledger(out.with_suffix(".json"), {"setting": setting, "benchmark": name,
                                               "base": common})  # fmt: skip
    ref_model = "tiny-bert" if args.quick else "minilm-l6"
    ref = references(common, ref_model)
    result: dict[str, Any] = {"rows": [], "sweep": [], "notes": [], "lrs": {}, "edge": [],
                              "verdict": [], "references": ref}  # fmt: skip

    def model_sets(model: str) -> list[str]:
        return [f"model.name={QUICK_MODELS[model] if args.quick else model}"]

    def write() -> None:
        result["verdict"] = verdict(result["rows"], 60 if args.quick else 500)
        result.update(command=command, setting=setting)
        ledger.data.update(result)
        ledger.save()
        out.with_suffix(".md").write_text(markdown(result))
        if any("curve" in r for r in result["rows"]):
            plot(result).savefig(out.with_suffix(".png"), dpi=110)

    # 1. each method's lr: a short run per grid point at 1x on minilm-l6
    for method in [m for m in args.methods if m in LRS]:
        points = []
        for lr in LRS[method]:
            cell = Cell(
                cell_key("sweep", "minilm-l6", "1x", method, lr),
                method,
                [
                    *METHOD_SETS[method],
                    *model_sets("minilm-l6"),
                    *budget_sets("1x", ref),
                    *sweep_sets,
                    f"train.lr={lr}",
                ],  # fmt: skip
                {"lr": lr},
            )
            points.append(run_or_exclude(ledger, common, cell, name))
        best = pick([q for q in points if "excluded_all" not in q])
        if best is None:
            result["notes"].append(f"{method}: every sweep point diverged or was excluded")
            continue
        result["sweep"] += [{**q, "chosen": q is best} for q in points]
        result["lrs"][method] = best["lr"]
        if at_edge(best["lr"], LRS[method]):
            result["edge"].append(method)
        if args.probe and method in PROBE and best["lr"] == max(LRS[method]):
            lr = PROBE[method]
            cell = Cell(cell_key("sweep", "minilm-l6", "1x", method, lr), method,
                        [*METHOD_SETS[method], *model_sets("minilm-l6"),
                         *budget_sets("1x", ref), *sweep_sets, f"train.lr={lr}"],
                        {"lr": lr})  # fmt: skip
            probe = run_or_exclude(ledger, common, cell, name)
            result["sweep"].append({**probe, "probe": True})
            if math.isfinite(probe.get("final_loss", math.nan)) and (
                probe["final_loss"] < best["final_loss"]
            ):
                result["notes"].append(
                    f"{method}: the probe lr {lr:g} past the grid had a lower sweep loss "
                    f"({probe['final_loss']:.3f} vs {best['final_loss']:.3f}); the long runs "
                    f"use the grid's {best['lr']:g}"
                )
        write()
    for method, source in LR_OF.items():
        if method in args.methods and source in result["lrs"]:
            result["lrs"][method] = result["lrs"][source]
    # 2. the long runs, most important settings first
    cells = (
        [(b, m, tuple(args.methods)) for b in args.budgets for m in args.models]
        if args.all
        else [c for c in CELLS if c[0] in args.budgets and c[1] in args.models]
    )
    for budget, model, methods in cells:
        for method in [m for m in methods if m in args.methods and m in result["lrs"]]:
            lr = result["lrs"][method]
            sets = budget_sets(budget, ref)
            cell = Cell(
                cell_key("long", model, budget, method, lr),
                method,
                [
                    *METHOD_SETS[method],
                    *model_sets(model),
                    *sets,
                    *long_sets,
                    f"train.lr={lr}",
                ],  # fmt: skip
                {"lr": lr, "model": model, "budget": budget},
            )
            row = dict(run_or_exclude(ledger, common, cell, name))
            row.update(model=model, budget=budget)
            row["budget_text"] = budget_label(budget, ref)
            if "run_dir" in row:
                add_trained(ledger, row)
            result["rows"].append(row)
            write()
    # 3. other seeds of the headline cells
    result["replicates"] = []
    for seed in range(1, args.seeds):
        for budget, model, methods in REPLICATE_CELLS:
            if budget not in args.budgets or model not in args.models:
                continue
            for method in [m for m in methods if m in args.methods and m in result["lrs"]]:
                lr = result["lrs"][method]
                cell = Cell(
                    cell_key("long", model, budget, method, lr) + f"-seed{seed}",
                    method,
                    [*METHOD_SETS[method], *model_sets(model), *budget_sets(budget, ref),
                     *long_sets, f"train.lr={lr}", f"run.seed={seed}"],
                    {"lr": lr, "model": model, "budget": budget, "seed": seed},
                )  # fmt: skip
                result["replicates"].append(dict(run_or_exclude(ledger, common, cell, name)))
                result["replicate_verdict"] = [
                    f"seed {s}, {line}"
                    for s in range(1, seed + 1)
                    for line in verdict(
                        [r for r in result["replicates"] if r.get("seed") == s],
                        60 if args.quick else 500,
                    )
                ]
                write()
    write()
    log(f"wrote {out.with_suffix('.md')} (run folders under {RUNS / name})")


if __name__ == "__main__":
    main()
