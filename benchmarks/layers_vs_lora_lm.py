"""Layer fine-tuning vs LoRA vs full fine-tuning under device memory budgets, on language
modelling: next-token perplexity on shakespeare with smollm2-19m.

    .venv/bin/python benchmarks/layers_vs_lora_lm.py            # sweep, then every cell (resumable)
    .venv/bin/python benchmarks/layers_vs_lora_lm.py --quick    # tiny-llama smoke test, ~2 min
    .venv/bin/python benchmarks/layers_vs_lora_lm.py --rounds 60 --budgets 1x \
        --methods layers lora --out benchmarks/results/layers_vs_lora_lm_60rounds

The language-modelling half of benchmarks/layers_vs_lora.py (the claim of Pfeiffer et al.,
arXiv 2411.07826: "layer fine-tuning beats LoRA at equal memory and FLOP budgets, and is on
par with it under tight upload budgets"; their own tasks include Shakespeare next-character
prediction). Same budgets, same cells and same tuning rule, on the paper's kind of task:

- Task: shakespeare, one client per speaking role (the 100 roles with the most speeches,
  natural split), 5 clients per round, 5 local AdamW steps of batch 8 x 64 tokens (the
  setting of benchmarks/communication.py), perplexity on 300 held-out speeches of every role.
  Every run starts from the same model (smollm2-19m as derived, round 0 in every curve).
- Budgets: fractions of smollm2-19m's full fine-tuning peak memory (margin included): 1/8x,
  1/4x, 1/2x, 1x homogeneous, ``het`` (the four tiers 1/8, 1/4, 1/2, 1x, a quarter of the
  devices each) and ``upload`` (memory 1x, upload per round at most LoRA r=8's own). There is
  no smaller pretrained decoder in the zoo, so the model-choice axis of the tweets benchmark
  has no counterpart here.
- Methods: ``layers`` (deepest top-n blocks that fit, with the tied embedding / LM head),
  ``lora`` (r = 8, alpha 16 on q_proj / v_proj), ``fedavg`` (every weight) and ``slt``
  (successive layer training: four stages up the blocks, at layers' lr). CoCoFL's
  bfloat16 prefix is not modelled for Llama (docs/methods.md) and is left out.
- Tuning: a client-lr sweep of ``SWEEP`` rounds at 1x per method of ``LRS``, the lowest final
  eval loss wins. Long runs: ``LONG``.

The ledger benchmarks/results/layers_vs_lora_lm.json keeps every finished cell (a rerun skips
them; a stopped cell resumes from its run folder under runs/bench/layers_vs_lora_lm).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from cells import RUNS, Cell, Ledger, at_edge, pick
from common import RESULTS, log
from layers_vs_lora import (
    METHOD_SETS,
    add_trained,
    budget_label,
    budget_sets,
    cell_key,
    exclusion_line,
    references,
    run_or_exclude,
)
from matplotlib.figure import Figure

from fedfit.units import format_bytes, format_flops

NAME = "layers_vs_lora_lm"
METHODS = ("layers", "lora", "fedavg", "slt")
# slt updates whole blocks as layers does and takes its swept lr
LR_OF = {"slt": "layers"}
BUDGETS = ("1x", "het", "1/2x", "upload", "1/4x", "1/8x")
# each grid's top point was added after the first three put the winner at the top
# edge; fedavg has its own sweep here (a sweep point is under a minute on this task)
LRS = {"layers": (1e-4, 3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2, 3e-2),
       "fedavg": (1e-4, 3e-4, 1e-3, 3e-3)}  # fmt: skip
# (budget, methods) in order of importance. From the planner (`fedfit plan`): at 1/2x only
# layers (top 1 block) fits, LoRA's activations do not; at 1/4x and 1/8x nothing fits; under
# LoRA's upload budget only LoRA fits, and its training there is the 1x run's exactly (the
# budget does not bind it), so only layers' planner row is made.
CELLS = (
    ("1x", ("layers", "lora", "fedavg", "slt")),
    ("het", ("layers", "lora", "slt")),
    ("1/2x", ("layers", "lora", "slt")),
    ("upload", ("layers",)),
    ("1/4x", ("layers", "lora")),
    ("1/8x", ("layers", "lora")),
)
COMMON = [
    "data.name=shakespeare",
    "data.partition=natural",
    "data.num_clients=100",
    "data.clients_per_round=5",
    "data.min_examples=10",
    "data.eval_examples=300",
    "train.local_steps=5",
    "train.batch_size=8",
    "model.max_length=64",
    "train.optimizer=adamw",
    "run.lanes=2",
    "train.bucket_by_length=true",
]
MODEL = "smollm2-19m"
SWEEP = ["run.rounds=6", "run.eval_every=6"]
LONG_ROUNDS = 30  # --rounds: another length, its cells keyed "-r<N>" beside these
LONG = [f"run.rounds={LONG_ROUNDS}", "run.eval_every=5"]
QUICK = ["data.num_clients=12", "data.clients_per_round=3", "data.eval_examples=40",
         "train.local_steps=2", "model.max_length=32"]  # fmt: skip
QUICK_MODEL = "tiny-llama"
QUICK_SWEEP = ["run.rounds=1", "run.eval_every=1"]
QUICK_LONG = ["run.rounds=2", "run.eval_every=1"]


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Layers against LoRA (then against SLT) per budget, by final perplexity (lower is
    better). A difference under 2% is called a tie: one eval set, no standard error of a
    perplexity is at hand."""
    by = {(r["budget"], r["method"]): r for r in rows}
    lora_1x = by.get(("1x", "lora"))
    lines = []
    for other in ("lora", "slt"):
        for budget in BUDGETS:
            a, b = by.get((budget, "layers")), by.get((budget, other))
            if (
                budget == "upload"
                and other == "lora"
                and a
                and b is None
                and lora_1x
                and ("excluded_all" not in lora_1x)
            ):
                b = lora_1x  # the same training: the upload budget does not bind LoRA
            if a and b:
                lines.append(compare(a, b, NAMES[other], f"at {budget}"))
    return lines


NAMES = {"lora": "LoRA", "slt": "SLT"}


def compare(a: dict[str, Any], b: dict[str, Any], other: str, where: str) -> str:
    """One verdict line: layers' row ``a`` against method ``other``'s row ``b``."""
    excluded = exclusion_line(a, b, "layers", other, where)
    if excluded is None:
        pa, pb = a["final_perplexity"], b["final_perplexity"]
        ratio = pa / pb
        word = "wins" if ratio < 0.98 else "loses" if ratio > 1.02 else "ties"
        return (
            f"{where}: layers {word} against {other} (perplexity {pa:.1f} vs {pb:.1f}, "
            f"{100 * (ratio - 1):+.1f}%; FLOPs per client round "
            f"{a['flops_per_client_round'] / b['flops_per_client_round']:.2f}x {other}'s)"
        )
    return excluded


def markdown(result: dict[str, Any]) -> str:
    out = [
        "# Layer fine-tuning vs LoRA vs full fine-tuning under memory budgets: language modelling",
        "",
        f"Command: `{result['command']}`",
        "",
        result["setting"],
        "",
        "Claim (Pfeiffer et al.): layer fine-tuning beats LoRA at equal memory and FLOP "
        "budgets, and is on par with it under tight upload budgets.",
        "",
        "Verdict, budget by budget (final held-out perplexity, lower is better):",
        "",
        *[f"- {line}" for line in result["verdict"]],
        "",
        *[f"Note: {n}" for n in result["notes"]],
        "",
        "Chosen client lr (sweep at 1x, lowest final eval loss): "
        + ", ".join(
            f"{m} {lr:g}" + (" (grid edge)" if m in result["edge"] else "")
            for m, lr in result["lrs"].items()
        ),
        "",
        "| budget | method | round 0 | final | best | last 10 rounds | devices trained | "
        "depth / rank | peak memory (max) | budget | FLOPs / client / round | "
        "upload / client / round | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head = f"| {r['budget']} | {r['method']} |"
        if "excluded_all" in r:
            reason = r["excluded_all"].split(": ", 1)[-1]
            out.append(f"{head} - | - | - | - | 0% | - | - | - | - | - | all excluded: {reason} |")
            continue
        curve = r.get("curve") or []
        last = (
            f"{100 * (curve[-1]['perplexity'] / curve[-3]['perplexity'] - 1):+.1f}%"
            if len(curve) >= 3
            else "-"
        )
        share = r.get("trained_share")
        out.append(
            f"{head} {r['start_perplexity']:.1f} | {r['final_perplexity']:.1f} | "
            f"{r['best_perplexity']:.1f} | {last} | "
            f"{'-' if share is None else f'{100 * share:.0f}%'} | {r.get('trained', '-')} | "
            f"{format_bytes(r['peak_memory_bytes_max'])} | {r['budget_text']} | "
            f"{format_flops(r['flops_per_client_round'])} | "
            f"{format_bytes(r['upload_bytes_per_client'])} | {r['cell_wall_s'] / 60:.1f} min |"
        )
    out += ["", "Sweep (final eval loss / perplexity after the sweep rounds; * = chosen):", "",
            "| method | lr | eval loss | perplexity |", "|---|---|---|---|"]  # fmt: skip
    for p in result["sweep"]:
        loss = "-" if p.get("final_loss") is None else f"{p['final_loss']:.3f}"
        ppl = p.get("final_perplexity")
        out.append(
            f"| {p['method']}{'*' if p.get('chosen') else ''} | {p['lr']:g} | {loss} | "
            f"{'-' if ppl is None else f'{ppl:.1f}'} |"
        )
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any]) -> Figure:
    """Held-out perplexity (log) by round, from round 0, per cell that ran."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    styles = {"1x": "-", "het": "--", "1/2x": ":", "1/4x": "-.", "upload": (0, (1, 3)),
              "1/8x": (0, (5, 5))}  # fmt: skip
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for r in result["rows"]:
        if "excluded_all" in r or not r.get("curve"):
            continue
        ax.plot([p["round"] for p in r["curve"]], [p["perplexity"] for p in r["curve"]],
                linestyle=styles[r["budget"]], color=colours[r["method"]], marker=".",
                label=f"{r['method']} {r['budget']}")  # fmt: skip
    ax.set_yscale("log")
    ax.set(title=f"{result['model']}, shakespeare", xlabel="round (0 = the model as derived)",
           ylabel="held-out perplexity")  # fmt: skip
    ax.legend(fontsize=7)
    return fig


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny-llama smoke test")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--budgets", nargs="+", choices=BUDGETS, default=list(BUDGETS))
    p.add_argument("--rounds", type=int, default=LONG_ROUNDS,
                   help=f"rounds of the long runs (default {LONG_ROUNDS})")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    name = NAME + ("-quick" if args.quick else "")
    out = args.out or (Path("/tmp") / name if args.quick else RESULTS / name)
    model = QUICK_MODEL if args.quick else MODEL
    common = [*COMMON, *(QUICK if args.quick else []), f"model.name={model}"]
    sweep_sets, long_sets = (QUICK_SWEEP, QUICK_LONG) if args.quick else (SWEEP, LONG)
    suffix = ""
    if args.rounds != LONG_ROUNDS and not args.quick:
        long_sets, suffix = [f"run.rounds={args.rounds}", "run.eval_every=5"], f"-r{args.rounds}"
    command = shlex.join([".venv/bin/python", "benchmarks/layers_vs_lora_lm.py", *argv])
    shape = (
        "12 clients, 3 per round, 2 local AdamW steps of 8 x 32 tokens"
        if args.quick
        else "100 clients, 5 per round, 5 local AdamW steps of 8 x 64 tokens"
    )
    setting = (
        f"{model}, shakespeare (natural split by role), {shape}; budgets are fractions of "
        "full fine-tuning's peak memory (margin included); perplexity on held-out speeches of every role "
        f"({40 if args.quick else 300}); sweep "
        f"{sweep_sets[0].split('=')[1]} rounds, long runs {long_sets[0].split('=')[1]} rounds "
        f"evaluated every {long_sets[1].split('=')[1]}."
    )
    ledger = Ledger(out.with_suffix(".json"), {"setting": setting, "benchmark": name,
                                               "base": common})  # fmt: skip
    ref = references(common, model, task="lm", num_labels=2)
    result: dict[str, Any] = {"rows": [], "sweep": [], "notes": [], "lrs": {}, "edge": [],
                              "verdict": [], "references": ref, "model": model}  # fmt: skip

    def write() -> None:
        result["verdict"] = verdict(result["rows"])
        result.update(command=command, setting=setting)
        ledger.data.update(result)
        ledger.save()
        out.with_suffix(".md").write_text(markdown(result))
        if any("curve" in r for r in result["rows"]):
            plot(result).savefig(out.with_suffix(".png"), dpi=110)

    def cell(stage: str, budget: str, method: str, lr: float, sets: list[str]) -> Cell:
        return Cell(
            cell_key(stage, model, budget, method, lr) + (suffix if stage == "long" else ""),
            method,
            [*METHOD_SETS[method], *budget_sets(budget, ref), *sets, f"train.lr={lr}"],
            {"lr": lr, "budget": budget},
        )

    for method in [m for m in args.methods if m in LRS]:
        points = [
            run_or_exclude(ledger, common, cell("sweep", "1x", method, lr, sweep_sets), name)
            for lr in LRS[method]
        ]
        best = pick([q for q in points if "excluded_all" not in q])
        if best is None:
            result["notes"].append(f"{method}: every sweep point diverged or was excluded")
            continue
        result["sweep"] += [{**q, "chosen": q is best} for q in points]
        result["lrs"][method] = best["lr"]
        if at_edge(best["lr"], LRS[method]):
            result["edge"].append(method)
        write()
    for method, source in LR_OF.items():
        if method in args.methods and source in result["lrs"]:
            result["lrs"][method] = result["lrs"][source]
    if "upload" in args.budgets:
        result["notes"].append(
            "At the upload budget LoRA is not run again: the budget does not bind it, so its "
            "training is the 1x run's, which the verdict uses."
        )
    for budget, methods in [c for c in CELLS if c[0] in args.budgets]:
        for method in [m for m in methods if m in args.methods and m in result["lrs"]]:
            lr = result["lrs"][method]
            row = dict(run_or_exclude(ledger, common, cell("long", budget, method, lr, long_sets),
                                      name))  # fmt: skip
            row["budget_text"] = budget_label(budget, ref)
            if "run_dir" in row:
                add_trained(ledger, row)
            result["rows"].append(row)
            write()
    write()
    log(f"wrote {out.with_suffix('.md')} (run folders under {RUNS / name})")


if __name__ == "__main__":
    main()
