"""Forward-gradient methods (Spry, FedFGD, FwdLLM, Baffle) against backprop and zero-order,
from a task-aligned start, at hundreds of rounds.

    .venv/bin/python benchmarks/forward_accuracy.py             # sweep, then the long runs
    .venv/bin/python benchmarks/forward_accuracy.py --quick     # smoke test on tiny-bert

Resumable: rerunning the same command skips every finished cell (benchmarks/cells.py).
Claims tested (Spry, Panchal et al., NeurIPS 2024; docs/methods.md):

- Spry ends within 6 points of backprop LoRA (FedAvg) at the same rounds (paper: 0.6-6.2);
- Spry ends above FedMeZO (paper: 5.2-13.5 points);
- each method ends at least 3 points above its own round 0, with an eval loss below the
  class-prior cross-entropy (else the table says it did not learn).

Setting (every row the same): tweets (3 classes), 100 clients with ``inner_dirichlet``
label skew alpha 1.0 (equal sizes, as Spry's data setup), ``--clients`` clients per round,
minilm-l3, batch 8, max length 64, ``--local-steps`` local steps; start: a federated
class-mean head from 10 clients (round 0). Trained tensors: LoRA r = 1, alpha = 1 on
query/value + head for every method (Spry's own script's LoRA). Spry: its tensors split among
the round's clients, the head split like the rest (Spry's script: ``classifier_share=False``;
fedfit's ``share_head`` option gives every client the head instead), server FedYogi (eta
0.01, beta 0.9 / 0.99, tau 1e-3) as in the paper; the others server FedAvg. FwdLLM and Baffle
get ``--tangents`` tangents / perturbations (their papers: 20; each costs one forward pass,
Baffle's two), FwdLLM picking them from 5x as many candidates. Client optimiser AdamW for the
forward-gradient and backprop rows; ZO-SGD for FedMeZO.

Tuning: AdamW lr over (3e-4, 1e-3, 3e-3) for every forward / backprop method; FedMeZO lr x
eps as in benchmarks/zeroorder.py; each point ``--sweep-rounds`` rounds, lowest final eval
loss wins.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cells import (
    STARTS,
    Cell,
    benchmark_args,
    learned,
    pct,
    rows_table,
    run_benchmark,
    start_overrides,
    sweep_table,
)

LORA = ["method.r=1", "method.alpha=1.0"]
YOGI = ["server.optimizer=fedyogi", "server.lr=0.01", "server.beta1=0.9", "server.beta2=0.99",
        "server.tau=0.001"]  # fmt: skip
FEDAVG = ["server.optimizer=fedavg", "server.lr=1.0"]
METHODS = ("spry", "fedavg-lora", "fedmezo", "fedfgd", "fwdllm", "baffle")
ADAMW_LRS = (3e-4, 1e-3, 3e-3)
ZO_LRS = (3e-4, 1e-3, 3e-3)
ZO_EPS = (1e-3, 1e-2)
# Baffle's step costs 2 forward passes per perturbation: two points, the winners of Spry
# (1e-3) and FedFGD (3e-3)
COSTLY = {"baffle": ((1e-3, 3e-3), (None,))}
# from a random head the head has far to go: two points each, from the class-mean sweeps'
# winners up (AdamW 1e-3, 3e-3; FedMeZO 3e-3, 1e-2 at eps 1e-2)
RANDOM_ADAMW_LRS = (1e-3, 3e-3)
RANDOM_ZO = ((3e-3, 1e-2), (1e-2,))
RANDOM_METHODS = ("spry", "fedavg-lora", "fedmezo")
FULL = {"rounds": 100, "sweep_rounds": 20, "local_steps": 10, "clients": 4, "eval_every": 10,
        "tangents": 4}  # fmt: skip
QUICK = {"rounds": 2, "sweep_rounds": 1, "local_steps": 2, "clients": 3, "eval_every": 1,
         "tangents": 2}  # fmt: skip


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "model.name=tiny-bert" if args.quick else "model.name=minilm-l3",
        "model.max_length=64",
        *start_overrides(args.start, args.quick),
        f"data.num_clients={12 if args.quick else 100}",
        f"data.clients_per_round={args.clients}",
        "data.partition=inner_dirichlet",
        "data.alpha=1.0",
        "data.min_examples=1",
        f"data.eval_examples={100 if args.quick else 500}",
        f"run.eval_every={args.eval_every}",
        f"run.threads={args.threads}",
        "train.batch_size=8",
        f"train.local_steps={args.local_steps}",
    ]


def method_overrides(method: str, lr: float, eps: float | None, tangents: int) -> list[str]:
    adamw = ["train.optimizer=adamw", f"train.lr={lr}"]
    if method == "fedavg-lora":
        return ["method.name=lora", *LORA, *FEDAVG, *adamw]
    if method == "fedmezo":
        return ["method.name=fedmezo", "method.peft=lora", *LORA, f"method.eps={eps}",
                "train.optimizer=sgd", f"train.lr={lr}", *FEDAVG]  # fmt: skip
    own = {
        "spry": ["method.share_head=false", *YOGI],
        "fedfgd": FEDAVG,
        "fwdllm": [f"method.tangents={tangents}", f"method.candidates={5 * tangents}", *FEDAVG],
        "baffle": [f"method.tangents={tangents}", *FEDAVG],
    }[method]
    return [f"method.name={method}", "method.peft=lora", *LORA, *own, *adamw]


def grid(method: str, start: str) -> tuple[tuple[float, ...], tuple[float | None, ...]]:
    """The method's lr values and eps values (see cells.sweep) from this start."""
    if start == "random":
        return RANDOM_ZO if method == "fedmezo" else (RANDOM_ADAMW_LRS, (None,))
    if method == "fedmezo":
        return ZO_LRS, ZO_EPS
    return COSTLY.get(method, (ADAMW_LRS, (None,)))


def cell(method: str, lr: float, eps: float | None, rounds: int, tag: str, tangents: int) -> Cell:
    # a long run's key holds its rounds: a longer run is another cell, a sweep point is not
    name = tag if tag == "sweep" else f"{tag}{rounds}"
    key = f"{name}-{method}-lr{lr:g}" + ("" if eps is None else f"-eps{eps:g}")
    return Cell(
        key,
        method,
        [*method_overrides(method, lr, eps, tangents), f"run.rounds={rounds}"],
        {"lr": lr, "eps": eps, "phase": tag},
    )


def claims(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        f"{r['method']}: {pct(r['start_accuracy'])} -> {pct(r['final_accuracy'])} "
        f"({100 * (r['final_accuracy'] - r['start_accuracy']):+.1f} points): "
        + ("learned" if learned(r) else "did NOT learn (< +3 points or loss above the prior)")
        for r in rows
    ]
    by = {r["method"]: r for r in rows}
    spry = by.get("spry")
    if spry and "fedavg-lora" in by:
        gap = by["fedavg-lora"]["final_accuracy"] - spry["final_accuracy"]
        verdict = "holds" if gap <= 0.06 else "does not hold"
        out.append(
            f"Spry within 6 points of backprop LoRA FedAvg at {spry['rounds']} rounds: {verdict} "
            f"(backprop {pct(by['fedavg-lora']['final_accuracy'])}, Spry "
            f"{pct(spry['final_accuracy'])}, gap {100 * gap:+.1f} points)"
        )
    if spry and "fedmezo" in by:
        lead = spry["final_accuracy"] - by["fedmezo"]["final_accuracy"]
        out.append(
            f"Spry above FedMeZO (paper: +5.2 to +13.5 points): "
            f"{'holds' if lead > 0 else 'does not hold'} ({100 * lead:+.1f} points)"
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Forward-gradient methods from {result['start']} (benchmarks/forward_accuracy.py)",
        "",
        f"Command: `{result['command']}`",
        "",
        result["setting"],
        "",
        *rows_table(result["rows"]),
        "",
        *sweep_table(result["sweep"]),
        "",
        "Claims:",
        "",
        *[f"- {c}" for c in result["claims"]],
        *[f"- {n}" for n in result["notes"]],
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    defaults = {"ncm": METHODS, "random": RANDOM_METHODS}
    args = benchmark_args(argv, __doc__, (FULL, QUICK), defaults,
                          "the head before round 1: federated class means, or random as Spry's "
                          "and FwdLLM's own scripts start", choices=METHODS)  # fmt: skip
    setting = (
        f"tweets, 100 clients inner_dirichlet(1.0), {args.clients} per round, minilm-l3, "
        f"batch 8, {args.local_steps} local steps, LoRA r=1 alpha=1 + head, "
        f"{STARTS[args.start][1]}, FwdLLM/Baffle {args.tangents} tangents; sweep "
        f"{args.sweep_rounds} rounds, long runs {args.rounds} rounds "
        f"({args.rounds * args.local_steps} sequential client steps)."
    )

    def make_cell(method: str, lr: float, eps: float | None, phase: str) -> Cell:
        rounds = args.sweep_rounds if phase == "sweep" else args.rounds
        return cell(method, lr, eps, rounds, phase, args.tangents)

    run_benchmark("forward_accuracy", args, setting, base_overrides(args), grid, make_cell,
                  claims, markdown)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
