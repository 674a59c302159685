"""Forward-mode methods against backprop (and zero-order, when registered): accuracy vs rounds
and vs wall time, side by side in one process.

    .venv/bin/python benchmarks/forward_accuracy.py [--rounds 15] [--alphas 1.0,0.1]
    .venv/bin/python benchmarks/forward_accuracy.py --quick      # smoke test, tiny-bert

Checks the claims of Spry (Panchal et al., NeurIPS 2024; SEEDS.md section 3): accuracy within
about 6 points of backprop FedAvg/FedYogi, above zero-order methods, and faster convergence
than zero-order methods. Every run starts from examples/default.toml (tweets, minilm-l6, LoRA
r=8 on query/value + head, 100 clients, 10 per round) with Spry's data setup: batch 8, max
length 64, label skew by ``inner_dirichlet`` (equal client sizes, class proportions
Dir(alpha)), alpha 1.0 and 0.1. Methods:

- spry: forward gradients on a per-client share of the LoRA tensors, server FedYogi (eta 0.01)
- fedfgd: forward gradients on every LoRA tensor, server FedAvg
- fwdllm: forward gradients with ``--tangents`` tangents picked from 5x as many candidates
- baffle: central finite differences with ``--tangents`` perturbations, sigma 1e-4
- fedavg-lora / fedyogi-lora: backprop LoRA with server FedAvg / FedYogi (eta 0.01)
- fedmezo: MeZO steps (ZO-SGD) in FedAvg on the same LoRA tensors

Every method but fedmezo uses the same client AdamW lr (``--lr``, default.toml's 3e-3, tuned
for backprop LoRA; not re-tuned per method; fedmezo's ZO-SGD gets 1e-4, see MEZO_LR) and ``--local-steps`` local steps per round (Spry's paper uses
one local epoch; that is 50+ steps per client here and does not fit the machine). FwdLLM and
Baffle default to 20 tangents/perturbations in fedfit; here they get ``--tangents`` (4) so a
run fits: each tangent costs a forward pass (Baffle: two).

Writes ``--out``.json / .md / .png; the JSON is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from common import DEFAULT_TOML, RESULTS, fill_sizes, log, run_and_read, write_outputs
from matplotlib.figure import Figure

from fedfit.algorithms import ALGORITHMS
from fedfit.config import apply_overrides, from_dict
from fedfit.report import format_bytes, format_duration, format_flops

BACKPROP = ("fedavg-lora", "fedyogi-lora")
FORWARD = ("spry", "fedfgd", "fwdllm", "baffle")
ZERO_ORDER = ("fedmezo",)
METHODS = (*FORWARD, *BACKPROP, *ZERO_ORDER)
ALGORITHM_OF = {"fedavg-lora": "lora", "fedyogi-lora": "lora"}  # the others: their own name
YOGI = ["server.optimizer=fedyogi", "server.lr=0.01", "server.beta1=0.9", "server.beta2=0.99"]
MEZO_LR = 1e-4
FULL = {"rounds": 15, "eval_examples": 500, "model": "minilm-l6", "eval_every": 3}
QUICK = {"rounds": 2, "eval_examples": 100, "model": "tiny-bert", "eval_every": 1}


def method_overrides(method: str, tangents: int) -> list[str]:
    """--set overrides that turn default.toml's LoRA run into this method's run."""
    lora = ["method.r=8", "method.alpha=16.0"]
    if method == "fedavg-lora":
        return ["method.name=lora", *lora, "server.optimizer=fedavg", "server.lr=1.0"]
    if method == "fedyogi-lora":
        return ["method.name=lora", *lora, *YOGI]
    if method == "spry":
        return ["method.name=spry", *lora, *YOGI]
    if method == "fwdllm":
        return [f"method.name={method}", *lora, f"method.tangents={tangents}",
                f"method.candidates={5 * tangents}"]  # fmt: skip
    if method == "baffle":
        return [f"method.name={method}", *lora, f"method.tangents={tangents}"]
    if method == "fedmezo":
        # ZO-SGD, not AdamW: the AdamW lr does not carry over. 1e-4 keeps MeZO's update norm
        # (lr * |z . grad| * |z|, ~ lr * sqrt(d)) near MeZO's own on OPT (1e-6 * sqrt(1e8))
        # for the ~75k LoRA + head numbers here; not tuned.
        return [*lora, "method.name=fedmezo", "method.peft=lora", f"train.lr={MEZO_LR}"]
    return [f"method.name={method}", *lora]


def make_config(method: str, alpha: float, args: argparse.Namespace) -> tuple[Any, list[str]]:
    raw = tomllib.loads(DEFAULT_TOML.read_text())
    raw["method"] = {"name": "lora"}
    overrides = [
        f"run.name={method}-alpha{alpha:g}",
        f"run.output_dir={json.dumps(str(args.runs_dir))}",
        f"run.rounds={args.rounds}",
        f"run.eval_every={args.eval_every}",
        f"model.name={args.model}",
        "model.max_length=64",
        "data.partition=inner_dirichlet",
        f"data.alpha={alpha}",
        "data.min_examples=1",
        f"data.eval_examples={args.eval_examples}",
        f"train.local_steps={args.local_steps}",
        "train.batch_size=8",
        f"train.lr={args.lr}",
        *method_overrides(method, args.tangents),
    ]
    if args.quick:
        overrides += ["data.num_clients=12", "data.clients_per_round=3"]
    return from_dict(apply_overrides(raw, overrides)), overrides


def measure_run(method: str, alpha: float, args: argparse.Namespace) -> dict[str, Any]:
    config, overrides = make_config(method, alpha, args)
    return {"method": method, "alpha": alpha, "overrides": overrides, **run_and_read(config)}


def first_reaching(row: dict[str, Any], target: float, key: str) -> float | None:
    """The ``key`` ("round" or "train_s") at the first evaluation reaching ``target``."""
    return next((p[key] for p in row["curve"] if p["accuracy"] >= target), None)


def claims(rows: list[dict[str, Any]]) -> list[str]:
    """One line per alpha and claim, computed from the rows, whichever way it falls."""
    lines = []
    for alpha in dict.fromkeys(r["alpha"] for r in rows):
        by = {r["method"]: r for r in rows if r["alpha"] == alpha}
        spry = by.get("spry")
        backprop = [by[m] for m in BACKPROP if m in by]
        if spry and backprop:
            best = max(backprop, key=lambda r: r["final_accuracy"])
            gap = 100 * (best["final_accuracy"] - spry["final_accuracy"])
            lines.append(
                f"alpha {alpha:g}: spry {100 * spry['final_accuracy']:.1f}% vs best backprop "
                f"({best['method']}) {100 * best['final_accuracy']:.1f}%: gap {gap:+.1f} points "
                f"(claim: within about 6): {'holds' if gap <= 6 else 'does not hold'}."
            )
        zo = [by[m] for m in ZERO_ORDER if m in by]
        if spry and zo:
            majority = spry["majority_baseline"]
            for z in zo:
                diff = 100 * (spry["final_accuracy"] - z["final_accuracy"])
                learned = max(spry["best_accuracy"], z["best_accuracy"]) > majority
                verdict = "holds" if diff > 0 else "does not hold"
                if not learned:
                    verdict += (
                        f", but neither beat the majority class ({100 * majority:.1f}%) at any "
                        "evaluation: not evidence either way"
                    )
                lines.append(
                    f"alpha {alpha:g}: spry minus {z['method']}: {diff:+.1f} points "
                    f"(claim: spry above zero-order): {verdict}."
                )
                target = min(spry["best_accuracy"], z["best_accuracy"])
                if target <= majority:
                    lines.append(
                        f"alpha {alpha:g}: convergence speed vs {z['method']} untested: the lower "
                        f"of the two best accuracies ({100 * target:.1f}%) is not above the "
                        f"majority class ({100 * majority:.1f}%)."
                    )
                    continue
                rs, rz = first_reaching(spry, target, "round"), first_reaching(z, target, "round")
                lines.append(
                    f"alpha {alpha:g}: rounds to {100 * target:.1f}% (the lower of the two best "
                    f"accuracies): spry {rs}, {z['method']} {rz}"
                    + (f" ({rz / rs:.2f}x)." if rs and rz else ".")
                )
        if spry and not zo:
            lines.append(
                f"alpha {alpha:g}: no zero-order method was registered when this ran, so the "
                "claims against zero-order are untested here."
            )
    return lines


def markdown(result: dict[str, Any]) -> str:
    args, rows = result["args"], result["rows"]
    majority = rows[0]["majority_baseline"] if rows else None
    out = [
        f"# Forward-mode fine-tuning vs backprop: {args['model']}, tweets",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{args['num_clients']} clients (inner Dirichlet label skew), {args['clients_per_round']} "
        f"per round, {args['rounds']} rounds x {args['local_steps']} local steps of batch 8 "
        f"(max length 64), client AdamW lr {args['lr']:g} for every method (fedmezo: ZO-SGD lr "
        f"{MEZO_LR:g}); FwdLLM and Baffle "
        f"with {args['tangents']} tangents/perturbations. Accuracy on {args['eval_examples']} "
        "held-out tweets (majority class "
        f"{'n/a' if majority is None else f'{100 * majority:.1f}%'}), evaluated every "
        f"{args['eval_every']} rounds. Time = training wall time (evaluation excluded), all "
        "methods run one after another in one process on this machine. Peak memory = max over "
        "client updates; FLOPs and upload per client per round (mean); all measured.",
        "",
        "Claims (SEEDS.md section 3): within about 6 points of backprop, above zero-order, "
        "faster convergence than zero-order.",
        "",
        *[f"- {line}" for line in result["claims"]],
        "",
        *[f"Note: {n}" for n in result.get("notes", [])],
        "",
        "| alpha | method | final acc. | best acc. | final eval loss | train time | peak memory "
        "| FLOPs / round | upload / round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['alpha']:g} | {r['method']} | {100 * r['final_accuracy']:.1f}% | "
            f"{100 * r['best_accuracy']:.1f}% | {r.get('final_loss', float('nan')):.4f} | "
            f"{format_duration(r['train_s'])} | "
            f"{format_bytes(r['peak_memory_bytes_max'])} | "
            f"{format_flops(r['flops_per_client_round'])} | "
            f"{format_bytes(r['upload_bytes_per_client'])} |"
        )
    out += ["", "Accuracy by round:", ""]
    for alpha in dict.fromkeys(r["alpha"] for r in rows):
        mine = [r for r in rows if r["alpha"] == alpha]
        evals = [p["round"] for p in mine[0]["curve"]]
        out += [
            f"alpha {alpha:g}:",
            "",
            "| method | " + " | ".join(f"r{e}" for e in evals) + " |",
            "|---|" + "---|" * len(evals),
        ]
        for r in mine:
            cells = " | ".join(f"{100 * p['accuracy']:.1f}" for p in r["curve"])
            out.append(f"| {r['method']} | {cells} |")
        out.append("")
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any]) -> Figure:
    rows = result["rows"]
    alphas = list(dict.fromkeys(r["alpha"] for r in rows))
    fig = Figure(figsize=(10, 3.6 * max(1, len(alphas))), layout="constrained")
    axes = fig.subplots(max(1, len(alphas)), 2, squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, alpha in enumerate(alphas):
        for r in (r for r in rows if r["alpha"] == alpha):
            style = {"color": f"C{methods.index(r['method'])}", "marker": "o", "markersize": 3}
            style["linestyle"] = "--" if r["method"] in BACKPROP else "-"
            xs = [p["round"] for p in r["curve"]]
            ys = [p["accuracy"] for p in r["curve"]]
            axes[i][0].plot(xs, ys, label=r["method"], **style)
            axes[i][1].plot([p["train_s"] / 60 for p in r["curve"]], ys, **style)
            majority = r["majority_baseline"]
        for j, xlabel in enumerate(("round", "training wall time (min)")):
            axes[i][j].axhline(majority, color="grey", linestyle=":", linewidth=0.8)
            axes[i][j].set_xlabel(xlabel)
            axes[i][j].set_ylabel("accuracy")
            axes[i][j].set_title(f"{result['args']['model']}, tweets, alpha {alpha:g}", fontsize=9)
        axes[i][0].legend(fontsize=7)
    return fig


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help=f"default {FULL['rounds']}")
    parser.add_argument("--eval-every", type=int, help=f"default {FULL['eval_every']}")
    parser.add_argument("--eval-examples", type=int, help=f"default {FULL['eval_examples']}")
    parser.add_argument("--model", help=f"default {FULL['model']}")
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="client AdamW lr, every method")
    parser.add_argument("--tangents", type=int, default=4, help="FwdLLM / Baffle tangents")
    parser.add_argument("--alphas", default="1.0,0.1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", help="output stem (default benchmarks/results/forward_accuracy)")
    parser.add_argument("--runs-dir", help="where the run folders go (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny-bert, 2 rounds")
    args = parser.parse_args(argv)
    fill_sizes(args, QUICK if args.quick else FULL)
    args.alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed {', '.join(METHODS)}")
    args.runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedfit-forward-"))
    if args.out is None:
        stem = "forward_accuracy_quick" if args.quick else "forward_accuracy"
        args.out = str((args.runs_dir if args.quick else RESULTS) / stem)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/forward_accuracy.py", *argv])
    methods = [m for m in args.methods if ALGORITHM_OF.get(m, m) in ALGORITHMS]
    notes = [f"{m} is not registered: skipped." for m in args.methods if m not in methods]
    for note in notes:
        log(note)
    result: dict[str, Any] = {
        "command": command,
        "args": {
            **{
                k: getattr(args, k)
                for k in (
                    "rounds",
                    "eval_every",
                    "eval_examples",
                    "model",
                    "local_steps",
                    "lr",
                    "tangents",
                )
            },
            "num_clients": 12 if args.quick else 100,
            "clients_per_round": 3 if args.quick else 10,
            "alphas": args.alphas,
            "methods": methods,
            "runs_dir": str(args.runs_dir),
        },  # fmt: skip
        "notes": notes,
        "rows": [],
        "claims": [],
    }
    out = Path(args.out)
    t_start = time.perf_counter()
    log(f"runs in {args.runs_dir}; results to {out}.md/.json/.png")
    for alpha in args.alphas:
        for method in methods:
            log(f"{method} at alpha {alpha:g} (elapsed {time.perf_counter() - t_start:.0f} s)")
            row = measure_run(method, alpha, args)
            log(f"  {method}: accuracy {row['final_accuracy']:.3f} in {row['train_s']:.0f} s")
            result["rows"].append(row)
            result["claims"] = claims(result["rows"])
            result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            write_outputs(result, out, markdown, plot)
    print(markdown(result))


if __name__ == "__main__":
    main()
