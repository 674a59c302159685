"""Zero-order federated fine-tuning: accuracy against client computation, rounds and upload.

    .venv/bin/python benchmarks/zeroorder.py --sweep [--rounds 30] [--model minilm-l3]
    .venv/bin/python benchmarks/zeroorder.py --lrs fedspzo=3e-4,... --eps fedspzo=1e-2,...
    .venv/bin/python benchmarks/zeroorder.py --quick [--sweep --sweep-rounds 1]   # smoke test

Checks the claim of FedSPZO (Aboelenien Ahmed et al., arXiv 2502.10239 v1; SEEDS.md section
2): the same accuracy as zero-order (ZO) federated baselines with 2.5-7x less client
computation. Every run starts from examples/default.toml (tweets, minilm-l6, 100 clients with
Dirichlet(0.5) label skew, 10 per round, batch 16, max length 64) and differs only in the
method, its step size and its perturbation scale. Methods:

- fedspzo: split perturbations (P1 = 1, P2 = 4, block 2 = the top block + head)
- fedmezo: MeZO steps (P = 1) in FedAvg, weights uploaded
- fedkseed / fedkseed-pro: seeds from a pool of 4096, scalars both ways
- decomfl: P = 5 shared per-round seeds, scalars both ways
- fedavg-lora: backprop LoRA with FedAvg and client AdamW lr 3e-3 (``--reference-lr``), the
  reference (not swept)

Each method runs at its paper defaults (fedfit's Options defaults; ``--method-set
METHOD:KEY=VALUE`` changes one) on the same trained tensors (``--peft``: LoRA r=8 on
query/value + head by default, the reference's tensors; ``full`` = every weight) with the same
local steps and batch. ``train.lr`` is the ZO-SGD step size, the server is FedAvg (lr 1), as
the seed/scalar methods require.

Tuning (``--sweep``), the same effort for every ZO method: a grid of 3 step sizes x 2
perturbation scales, each point a ``--sweep-rounds``-round run (evaluated at its last round),
best by final accuracy, ties broken by the lower final eval loss. The grids (``--sweep-lrs`` /
``--sweep-eps`` replace them):

- peft lora: lr 1e-4, 1e-3, 1e-2; eps 1e-3, 1e-2 (MeZO's LoRA setting on OPT: lr 1e-4 .. 5e-5,
  eps 1e-2; a ~75k-number LoRA + head on MiniLM may take larger steps, hence a decade apart)
- peft full: lr 1e-6, 1e-5, 1e-4; eps 1e-4, 1e-3 (MeZO's full setting: lr 1e-6 .. 1e-7, eps 1e-3)

A pick at the edge of the lr grid is flagged in the report (the grid may be too narrow).

``--lrs method=value,...`` and ``--eps method=value,...`` give the values instead: a method
given both is not swept. Without ``--sweep`` a method takes the given values, else the middle
of the grid (untuned, said so in the report).

Headline: a target accuracy (``--target``; by default the lowest of the ZO methods' best
accuracies, so every ZO method reaches it) and, per method, the cumulative client FLOPs,
rounds and upload bytes at the first evaluation reaching it, with each method's FLOPs over
FedSPZO's. Client FLOPs are measured (matrix products of every forward / backward pass, plus
the replay of downloaded (seed, scalar) pairs for FedKSeed and DeComFL); their resolution is
``--eval-every`` rounds. Writes ``--out``.json / .md / .png; the JSON is rewritten after every
run so a stopped benchmark keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_TOML,
    RESULTS,
    by_round_table,
    fill_sizes,
    log,
    notes_lines,
    run_and_read,
    write_outputs,
)
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from fedfit.algorithms import ALGORITHMS
from fedfit.config import Config, apply_overrides, from_dict
from fedfit.report import format_bytes, format_duration, format_flops

SPZO = "fedspzo"
ZERO_ORDER = (SPZO, "fedmezo", "fedkseed", "fedkseed-pro", "decomfl")
REFERENCE = "fedavg-lora"
METHODS = (*ZERO_ORDER, REFERENCE)
ALGORITHM_OF = {REFERENCE: "lora"}  # the others: their own name
PEFTS = ("lora", "full")
# 3 step sizes x 2 perturbation scales per peft, the same for every ZO method.
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "lora": {"lrs": (1e-4, 1e-3, 1e-2), "eps": (1e-3, 1e-2)},
    "full": {"lrs": (1e-6, 1e-5, 1e-4), "eps": (1e-4, 1e-3)},
}
CLAIM = (2.5, 7.0)  # FedSPZO v1: 2.5-7x less client computation than ZO baselines
FULL = {"rounds": 30, "eval_every": 2, "eval_examples": 500, "model": "minilm-l6",
        "local_steps": 10, "sweep_rounds": 3}  # fmt: skip
QUICK = {"rounds": 2, "eval_every": 1, "eval_examples": 100, "model": "tiny-bert",
         "local_steps": 2, "sweep_rounds": 1}  # fmt: skip
QUICK_DATA = {"num_clients": 12, "clients_per_round": 3}


def method_overrides(method: str, peft: str, lr: float, eps: float | None) -> list[str]:
    """--set overrides that turn default.toml's LoRA run into this method's run."""
    lora = ["method.r=8", "method.alpha=16.0"]
    fedavg = ["server.optimizer=fedavg", "server.lr=1.0"]
    if method == REFERENCE:
        return ["method.name=lora", *lora, *fedavg, "train.optimizer=adamw", f"train.lr={lr}"]
    return [
        f"method.name={method}",
        f"method.peft={peft}",
        *(lora if peft == "lora" else []),
        f"method.eps={eps}",
        *fedavg,
        f"train.lr={lr}",
    ]


def make_config(
    name: str, method: str, lr: float, eps: float | None, args: argparse.Namespace, sweep: bool
) -> tuple[Config, list[str]]:
    """The run's config: default.toml, this method and (lr, eps), the benchmark's sizes (a
    sweep point: ``--sweep-rounds`` rounds, evaluated at the last one only)."""
    rounds = args.sweep_rounds if sweep else args.rounds
    raw = tomllib.loads(DEFAULT_TOML.read_text())
    raw["method"] = {"name": "lora"}
    overrides = [
        f"run.name={name}",
        f"run.output_dir={json.dumps(str(args.runs_dir))}",
        f"run.rounds={rounds}",
        f"run.eval_every={rounds if sweep else args.eval_every}",
        f"model.name={args.model}",
        f"data.eval_examples={args.eval_examples}",
        f"train.local_steps={args.local_steps}",
        f"train.batch_size={args.batch_size}",
        *method_overrides(method, args.peft, lr, eps),
        *args.method_set.get(method, []),
    ]
    if args.quick:
        overrides += [f"data.{k}={v}" for k, v in QUICK_DATA.items()]
    if sweep and args.sweep_clients:
        overrides.append(f"data.clients_per_round={args.sweep_clients}")
    return from_dict(apply_overrides(raw, overrides)), overrides


def execute(
    name: str, method: str, lr: float, eps: float | None, args: argparse.Namespace, sweep: bool
) -> dict[str, Any]:
    """One federated run; its accuracy curve against FLOPs, rounds, upload and train time."""
    config, overrides = make_config(name, method, lr, eps, args, sweep)
    row = {"method": method, "lr": lr, "eps": eps, "overrides": overrides}
    return {**row, **run_and_read(config)}


def sweep_key(point: dict[str, Any]) -> tuple[float, float]:
    """Higher is better: final accuracy, then the lower final loss (NaN loss ranks last)."""
    loss = point["final_loss"]
    return point["final_accuracy"], -loss if math.isfinite(loss) else -math.inf


def pick(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best finished point of one method's sweep."""
    done = [p for p in points if "error" not in p]
    return max(done, key=sweep_key) if done else None


def first_reaching(row: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first evaluation of ``row`` at or above ``target`` (None: never)."""
    return next((p for p in row["curve"] if p["accuracy"] >= target), None)


def default_target(rows: list[dict[str, Any]]) -> tuple[float, str] | None:
    """The lowest best accuracy among the ZO methods (so each reaches it) and whose it is."""
    zo = [r for r in rows if r["method"] in ZERO_ORDER]
    if not zo:
        return None
    low = min(zo, key=lambda r: r["best_accuracy"])
    return low["best_accuracy"], low["method"]


def headline(rows: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """Per method: FLOPs, rounds, upload and train time to ``target``; FLOPs over FedSPZO's."""
    reached = {r["method"]: first_reaching(r, target) for r in rows}
    spzo = reached.get(SPZO)
    out = []
    for r in rows:
        hit = reached[r["method"]]
        ratio = (
            hit["client_flops"] / spzo["client_flops"]
            if hit and spzo and spzo["client_flops"] > 0
            else None
        )
        out.append(
            {"method": r["method"], "reached": hit is not None,
             "client_flops": hit and hit["client_flops"], "round": hit and hit["round"],
             "upload_bytes": hit and hit["upload_bytes"], "train_s": hit and hit["train_s"],
             "flops_ratio_vs_fedspzo": ratio}
        )  # fmt: skip
    return out


def verdict(heads: list[dict[str, Any]], target: float) -> str:
    """One line on the claim, from the numbers, whichever way it falls."""
    by = {h["method"]: h for h in heads}
    baselines = [h for h in heads if h["method"] in ZERO_ORDER and h["method"] != SPZO]
    claim = f"(claim: {CLAIM[0]:g}-{CLAIM[1]:g}x less client computation than ZO baselines)"
    at = f"to reach {100 * target:.1f}%"
    if SPZO not in by or not baselines:
        return f"Untested: needs fedspzo and at least one ZO baseline {claim}."
    if not by[SPZO]["reached"]:
        return f"Does not hold: fedspzo never reached {100 * target:.1f}% {claim}."
    ratios = {h["method"]: h["flops_ratio_vs_fedspzo"] for h in baselines if h["reached"]}
    never = [h["method"] for h in baselines if not h["reached"]]
    parts = [f"{m} {v:.2f}x" for m, v in ratios.items()] + [f"{m} never" for m in never]
    line = f"Client FLOPs {at}, baseline / fedspzo: {', '.join(parts)} {claim}: "
    if not ratios:
        return line + "holds (no baseline reached the target)."
    low, high = min(ratios.values()), max(ratios.values())
    if low >= CLAIM[0]:
        return line + f"holds ({low:.2f}-{high:.2f}x)."
    if low > 1:
        return line + f"fedspzo is cheaper but by less than claimed ({low:.2f}-{high:.2f}x)."
    cheaper = [m for m, v in ratios.items() if v <= 1]
    return line + f"does not hold ({', '.join(cheaper)} needed no more FLOPs than fedspzo)."


def summarise(result: dict[str, Any], given_target: float | None) -> None:
    """Fill in the target, the headline rows and the verdict from the finished rows."""
    rows = result["rows"]
    if given_target is not None:
        target, why = given_target, "given by --target"
    elif found := default_target(rows):
        target, why = found[0], f"the lowest best accuracy among the ZO methods ({found[1]}'s)"
    else:
        result.update(target=None, target_reason="no ZO method ran", headline=[], verdict="")
        return
    heads = headline(rows, target)
    result.update(target=target, target_reason=why, headline=heads, verdict=verdict(heads, target))
    firsts = [r["curve"][0]["accuracy"] >= target for r in rows if r["curve"]]
    if len(firsts) > 1 and all(firsts):
        result["caveats"] = [
            "Every method reached the target at its first evaluation: the FLOPs ratios are "
            "ratios of cost per round, not of convergence (raise --target or evaluate more often)."
        ]
    else:
        result["caveats"] = []


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def markdown(result: dict[str, Any]) -> str:
    args, rows = result["args"], result["rows"]
    majority = rows[0]["majority_baseline"] if rows else None
    grid = result["grid"]
    out = [
        f"# Zero-order federated fine-tuning: {args['model']}, tweets",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{args['num_clients']} clients (Dirichlet(0.5) label skew), {args['clients_per_round']} "
        f"per round, {args['rounds']} rounds x {args['local_steps']} local steps of batch "
        f"{args['batch_size']} (max length 64). ZO methods train peft={args['peft']} with ZO-SGD "
        "(train.lr = step size), server FedAvg; fedavg-lora: backprop LoRA r=8, client AdamW lr "
        f"{args['reference_lr']:g}. Accuracy on {args['eval_examples']} held-out tweets "
        f"(majority class {_pct(majority)}), evaluated every {args['eval_every']} rounds. Client "
        "FLOPs: measured matrix-product FLOPs of every client's passes, plus the replay of "
        "downloaded (seed, scalar) pairs (FedKSeed, DeComFL), cumulated over the round's clients. "
        "Train time: training wall time (evaluation excluded), all runs one after another in one "
        "process. Peak memory: max over client updates; upload / download per client per round: "
        "mean.",
        "",
        f"Tuning: {result['tuning']}. Grid (lr x eps, the same for every ZO method): lr "
        f"{', '.join(f'{v:g}' for v in grid['lrs'])}; eps {', '.join(f'{v:g}' for v in grid['eps'])}"
        f"; {args['sweep_rounds']} rounds per point"
        + (f" with {args['sweep_clients']} clients per round" if args["sweep_clients"] else "")
        + "; best by final accuracy, ties by lower eval loss.",
        "",
    ]
    if result.get("target") is not None:
        target = result["target"]
        out += [
            f"Target accuracy {_pct(target)}: {result['target_reason']}."
            + (
                f" It is below, or within one point of, the majority class ({_pct(majority)}):"
                " reaching it says little, and the FLOPs ratios then compare cost per round."
                if majority is not None and target <= majority + 0.01
                else ""
            ),
            "",
            f"**{result['verdict']}**",
            "",
        ]
    out += notes_lines(result)
    heads = {h["method"]: h for h in result.get("headline", [])}
    out += [
        "| method | lr | eps | final acc. | best acc. | FLOPs to target | / fedspzo's "
        "| rounds to target | upload to target | upload / client / round "
        "| download / client / round | peak memory | train time | lr, eps from |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h = heads.get(r["method"])
        hit = h is not None and h["reached"]
        ratio = h and h["flops_ratio_vs_fedspzo"]
        out.append(
            f"| {r['method']} | {r['lr']:g} | {_num(r['eps'])} | {_pct(r['final_accuracy'])} | "
            f"{_pct(r['best_accuracy'])} | "
            + (
                f"{format_flops(h['client_flops'])} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} | {h['round']} | "
                f"{format_bytes(h['upload_bytes'])} | "
                if hit
                else "never reached | - | - | - | "
            )
            + f"{format_bytes(r['upload_bytes_per_client'])} | "
            f"{format_bytes(r['download_bytes_per_client'])} | "
            f"{format_bytes(r['peak_memory_bytes_max'])} | {format_duration(r['train_s'])} | "
            f"{result['picked'][r['method']]['source']} |"
        )
    if result["sweep"]:
        out += [
            "",
            "Sweep (every point):",
            "",
            "| method | lr | eps | final acc. | final loss | train time | picked |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in result["sweep"]:
            picked = result["picked"].get(p["method"], {})
            mark = "yes" if (picked.get("lr"), picked.get("eps")) == (p["lr"], p["eps"]) else ""
            if "error" in p:
                out.append(f"| {p['method']} | {p['lr']:g} | {p['eps']:g} | error: "
                           f"{p['error']} | | | |")  # fmt: skip
                continue
            out.append(
                f"| {p['method']} | {p['lr']:g} | {p['eps']:g} | {_pct(p['final_accuracy'])} | "
                f"{p['final_loss']:.4f} | {format_duration(p['train_s'])} | {mark} |"
            )
    out += by_round_table(
        "Accuracy by round", "method", rows, "method", lambda p: f"{100 * p['accuracy']:.1f}"
    )
    return "\n".join(out) + "\n"


def _minor_label(value: float, fmt: Callable[[float], str]) -> str:
    """Label the 2x and 5x minor ticks of a log axis only, so that labels do not collide."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return fmt(value) if round(mantissa) in (2, 5) else ""


def plot(result: dict[str, Any]) -> Figure:
    """Accuracy against cumulative client FLOPs (log), rounds and upload bytes (log)."""
    rows = result["rows"]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (
        ("client_flops", "cumulative client FLOPs", format_flops),
        ("round", "round", None),
        ("upload_bytes", "cumulative upload bytes", format_bytes),
    )
    for r in rows:
        i = METHODS.index(r["method"])
        style = {"color": "black" if r["method"] == REFERENCE else f"C{i}", "marker": "o",
                 "markersize": 3, "label": r["method"]}  # fmt: skip
        ys = [p["accuracy"] for p in r["curve"]]
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            ax.plot([p[key] for p in r["curve"]], ys, **style)
    majority = rows[0]["majority_baseline"] if rows else None
    for ax, (_, xlabel, fmt) in zip(axes, panels, strict=True):
        if majority is not None:
            ax.axhline(majority, color="grey", linestyle="--", linewidth=0.8, label="majority")
        if result.get("target") is not None:
            ax.axhline(result["target"], color="grey", linestyle=":", linewidth=0.8,
                       label="target")  # fmt: skip
        if fmt is None:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _, f=fmt: f(v)))
            low, high = ax.get_xlim()
            # Under ~1.5 decades the major ticks alone may be one or none: label 2x and 5x.
            minor = FuncFormatter(lambda v, _, f=fmt: _minor_label(v, f))
            ax.xaxis.set_minor_formatter(minor if high < 30 * low else NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
    args = result["args"]
    axes[0].set_title(
        f"{args['model']}, tweets, Dir(0.5), peft={args['peft']}, "
        f"{args['clients_per_round']}/{args['num_clients']} clients per round",
        fontsize=9,
    )
    axes[0].legend(fontsize=7)
    return fig


def _floats(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(float(v) for v in text.split(",") if v.strip())


def _per_method(text: str, flag: str, parser: argparse.ArgumentParser) -> dict[str, float]:
    """``method=value,...`` -> {method: value}."""
    out = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        method, sep, value = item.partition("=")
        if not sep or method not in METHODS:
            parser.error(f"{flag}: expected method=value with a method of {', '.join(METHODS)}")
        out[method] = float(value)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, kind in (("rounds", int), ("eval_every", int), ("eval_examples", int),
                      ("model", str), ("local_steps", int), ("sweep_rounds", int)):  # fmt: skip
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, type=kind, help=f"default {FULL[key]} (--quick: {QUICK[key]})")
    parser.add_argument("--batch-size", type=int, default=16, help="client minibatch (16)")
    parser.add_argument("--peft", choices=PEFTS, default="lora", help="ZO methods' tensors")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sweep", action="store_true", help="tune (lr, eps) per ZO method")
    parser.add_argument("--sweep-lrs", help="comma-separated step sizes (default: per peft)")
    parser.add_argument("--sweep-eps", help="comma-separated perturbation scales (per peft)")
    parser.add_argument(
        "--sweep-clients", type=int, help="clients per round in the sweep (default: as the runs)"
    )
    parser.add_argument("--lrs", default="", help="method=lr,... (skips the sweep with --eps)")
    parser.add_argument("--eps", default="", help="method=eps,...")
    parser.add_argument("--reference-lr", type=float, default=3e-3, help="fedavg-lora AdamW lr")
    parser.add_argument(
        "--method-set",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="extra --set for one method's runs, e.g. decomfl:method.perturbations=2",
    )
    parser.add_argument("--target", type=float, help="target accuracy (default: see docstring)")
    parser.add_argument("--out", help="output stem (default benchmarks/results/zeroorder)")
    parser.add_argument("--runs-dir", help="where the run folders go (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny-bert, 2 rounds")
    args = parser.parse_args(argv)
    fill_sizes(args, QUICK if args.quick else FULL)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed {', '.join(METHODS)}")
    args.lrs = _per_method(args.lrs, "--lrs", parser)
    args.eps = _per_method(args.eps, "--eps", parser)
    method_set: dict[str, list[str]] = {}
    for item in args.method_set:
        method, sep, override = item.partition(":")
        if not sep or method not in METHODS or "=" not in override:
            parser.error(f"--method-set {item!r}: expected METHOD:section.key=value")
        method_set.setdefault(method, []).append(override)
    args.method_set = method_set
    grid = GRIDS[args.peft]
    args.grid = {"lrs": _floats(args.sweep_lrs) or grid["lrs"],
                 "eps": _floats(args.sweep_eps) or grid["eps"]}  # fmt: skip
    args.runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedfit-zeroorder-"))
    if args.out is None:
        stem = "zeroorder_quick" if args.quick else "zeroorder"
        args.out = str((args.runs_dir if args.quick else RESULTS) / stem)
    return args


def settings(method: str, args: argparse.Namespace, swept: dict[str, Any]) -> dict[str, Any]:
    """The (lr, eps) a method's main run uses, and where they come from."""
    if method == REFERENCE:
        return {"lr": args.reference_lr, "eps": None, "source": "fixed (backprop reference)"}
    if method in swept:
        return {"lr": swept[method]["lr"], "eps": swept[method]["eps"], "source": "sweep"}
    lrs, eps = args.grid["lrs"], args.grid["eps"]
    given = [k for k, d in (("lr", args.lrs), ("eps", args.eps)) if method in d]
    return {
        "lr": args.lrs.get(method, lrs[len(lrs) // 2]),
        "eps": args.eps.get(method, eps[len(eps) // 2]),
        "source": f"given ({', '.join(given)})" if given else "grid middle (untuned)",
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/zeroorder.py", *argv])
    methods = [m for m in args.methods if ALGORITHM_OF.get(m, m) in ALGORITHMS]
    notes = [f"{m} is not registered: skipped." for m in args.methods if m not in methods]
    notes += [f"{m}: extra overrides {', '.join(s)}." for m, s in args.method_set.items()]
    for note in notes:
        log(note)
    to_sweep = [m for m in methods if m in ZERO_ORDER and not (m in args.lrs and m in args.eps)]
    to_sweep = to_sweep if args.sweep else []
    keys = ("rounds", "eval_every", "eval_examples", "model", "local_steps", "batch_size", "peft",
            "sweep_rounds", "sweep_clients", "reference_lr", "target")  # fmt: skip
    result: dict[str, Any] = {
        "command": command,
        "args": {
            **{k: getattr(args, k) for k in keys},
            "num_clients": QUICK_DATA["num_clients"] if args.quick else 100,
            "clients_per_round": QUICK_DATA["clients_per_round"] if args.quick else 10,
            "methods": methods,
            "runs_dir": str(args.runs_dir),
        },
        "grid": args.grid,
        "tuning": (f"swept {', '.join(to_sweep)}; " if to_sweep else "no sweep; ")
        + "not swept: the given values, else the grid's middle point (untuned)",
        "notes": notes,
        "sweep": [],
        "picked": {},
        "rows": [],
    }
    out = Path(args.out)
    t_start = time.perf_counter()

    def save() -> None:
        summarise(result, args.target)
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_outputs(result, out, markdown, plot)

    log(f"runs in {args.runs_dir}; results to {out}.md/.json/.png")
    swept: dict[str, Any] = {}
    for method in to_sweep:
        points = []
        for lr in args.grid["lrs"]:
            for eps in args.grid["eps"]:
                name = f"sweep-{method}-lr{lr:g}-eps{eps:g}"
                log(f"{name} (elapsed {time.perf_counter() - t_start:.0f} s)")
                try:
                    point = execute(name, method, lr, eps, args, sweep=True)
                except Exception as exc:  # one diverging point must not end the sweep
                    log(f"  {name} failed: {exc!r}")
                    point = {"method": method, "lr": lr, "eps": eps, "error": repr(exc)}
                point.pop("curve", None)
                points.append(point)
                result["sweep"].append(point)
                save()
        best = pick(points)
        if best is None:
            result["notes"].append(f"{method}: every sweep point failed; run with the defaults.")
        else:
            swept[method] = best
            log(f"  {method}: picked lr {best['lr']:g}, eps {best['eps']:g}")
            if best["lr"] in (min(args.grid["lrs"]), max(args.grid["lrs"])):
                result["notes"].append(
                    f"{method}: the picked lr {best['lr']:g} is at the edge of the grid; a "
                    "better one may lie beyond it."
                )
    for method in methods:
        result["picked"][method] = settings(method, args, swept)
    save()
    for method in methods:
        chosen = result["picked"][method]
        log(f"{method} lr {chosen['lr']:g} eps {_num(chosen['eps'])} "
            f"(elapsed {time.perf_counter() - t_start:.0f} s)")  # fmt: skip
        row = execute(method, method, chosen["lr"], chosen["eps"], args, sweep=False)
        log(f"  {method}: accuracy {row['final_accuracy']:.3f} in {row['train_s']:.0f} s")
        result["rows"].append(row)
        save()
    print(markdown(result))


if __name__ == "__main__":
    main()
