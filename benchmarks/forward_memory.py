"""Peak memory of one client step: Spry and FedFGD (forward gradients) vs backprop LoRA and
backprop full fine-tuning, measured on the real models.

    .venv/bin/python benchmarks/forward_memory.py                 # minilm-l6 and smollm2-135m
    .venv/bin/python benchmarks/forward_memory.py --quick         # tiny-bert, tiny-llama
    .venv/bin/python benchmarks/forward_memory.py --device cuda   # CUDA peak memory

Checks Spry's claim (docs/methods.md): peak memory 1.4-7.1x lower than backprop, mostly
from activations. Every step is the engine's own: the method's ``prepare`` (LoRA r=8 on
query/value + head for classification, on q_proj/v_proj for the causal LM), the method's
gradient computation (Spry: the share of client 0 of a 10-client round; FedFGD: every LoRA
tensor; one tangent), AdamW, and the mode the engine runs it in (backprop in train mode,
forward-mode in eval mode). A first step creates the optimiser state, the second is measured
(steady state). Memory on CPU: fedfit's MemoryTracker (every storage allocated, by category);
on CUDA: ``torch.cuda.max_memory_allocated`` over the measured step, whose weights are the
same. FLOPs: FlopCounterMode. Time: one more, unmeasured step; this machine is shared, so
times are indicative, ratios in one run.

Writes ``--out``.json / .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfit.algorithms import make_algorithm
from fedfit.config import load_config
from fedfit.costs import measure_step, run_step
from fedfit.log import log
from fedfit.models import load_model
from fedfit.units import format_bytes, format_flops

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("full", "lora", "fedfgd", "spry")
ALGORITHM = {"full": "fedavg", "lora": "lora", "fedfgd": "fedfgd", "spry": "spry"}
FULL = {
    "minilm-l6": [(8, 64), (8, 128), (32, 64), (32, 128)],
    "smollm2-135m": [(4, 64), (4, 128), (8, 128), (8, 256)],
}
QUICK = {"tiny-bert": [(4, 32), (16, 64)], "tiny-llama": [(4, 32)]}
TASK = {"minilm-l6": "classification", "tiny-bert": "classification"}


def make_batch(task: str, batch: int, length: int, device: str) -> dict[str, torch.Tensor]:
    """Random real-vocabulary tokens, every sequence ``length`` long (no padding)."""
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(1000, 5000, size=(batch, length)), device=device)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "lm":
        out["labels"] = ids.clone()
    else:
        out["labels"] = torch.tensor(rng.integers(0, 3, size=batch), device=device)
    return out


def prepared(method: str, model_name: str, task: str, device: str) -> tuple[Any, Any, Any]:
    """(algorithm, model, config) set up exactly as the engine does for this method."""
    config = load_config(None, [f"method.name={ALGORITHM[method]}", "train.lr=1e-4"])
    model, _ = load_model(model_name, task, num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, task).to(device)
    return algorithm, model, config


def step_for(method: str, algorithm: Any, model: torch.nn.Module) -> tuple[Any, list]:
    """The method's gradient computation and the parameters its optimiser steps."""
    if method in ("full", "lora"):
        model.train()
        from fedfit.costs import backprop

        return backprop, [p for p in model.parameters() if p.requires_grad]
    model.eval()
    state = algorithm.init(model)
    algorithm.start_round(state, list(range(10)))
    task = algorithm.configure(state, 0, seed=1)
    names = algorithm.load_and_select(model, task)
    named = dict(model.named_parameters())
    params = {n: named[n] for n in names}
    generator = torch.Generator(device=next(model.parameters()).device.type).manual_seed(1)
    return algorithm.step_fn(params, task, generator), list(params.values())


def measure(method: str, model_name: str, shape: tuple[int, int], device: str) -> dict[str, Any]:
    task = TASK.get(model_name, "lm")
    algorithm, model, _ = prepared(method, model_name, task, device)
    step, params = step_for(method, algorithm, model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = make_batch(task, *shape, device)
    run_step(model, optimizer, batch, step)  # creates the optimiser state
    row: dict[str, Any] = {
        "model": model_name,
        "method": method,
        "batch": shape[0],
        "length": shape[1],
        "trained_params": sum(p.numel() for p in params),
    }
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _, memory, flops = measure_step(model, optimizer, batch, step)
        torch.cuda.synchronize()
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        _, memory, flops = measure_step(model, optimizer, batch, step)
    t0 = time.perf_counter()
    run_step(model, optimizer, batch, step)
    if device == "cuda":
        torch.cuda.synchronize()
    row.update(memory.as_dict(), flops=flops, step_s=round(time.perf_counter() - t0, 3))
    del model, optimizer, algorithm
    gc.collect()
    return row


def ratios(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Per (model, shape): backprop's peak over Spry's (and FedFGD's)."""
    out = []
    shapes = dict.fromkeys((r["model"], r["batch"], r["length"]) for r in rows)
    for model, batch, length in shapes:
        by = {
            r["method"]: r
            for r in rows
            if (r["model"], r["batch"], r["length"]) == (model, batch, length)
        }
        if "spry" not in by:
            continue
        spry = by["spry"][key]
        out.append(
            {
                "model": model,
                "batch": batch,
                "length": length,
                **{f"{m}/spry": by[m][key] / spry for m in ("full", "lora", "fedfgd") if m in by},
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    key = result["peak_key"]
    rows = result["rows"]
    device = result["device"]
    out = [
        f"# Peak memory of one client step: forward gradients vs backprop ({device})",
        "",
        f"Command: `{result['command']}`",
        "",
        "One steady-state client step (AdamW state resident) on the real model, as the engine "
        "runs it: full = backprop, every parameter; lora = backprop, LoRA r=8 (query/value or "
        "q_proj/v_proj) + head; fedfgd = one jvp over every LoRA tensor; spry = one jvp over "
        "client 0's share of a 10-client round (LoRA groups g with g mod 10 = 0, + head). "
        f"Peak = {'torch.cuda.max_memory_allocated' if device == 'cuda' else 'MemoryTracker'}"
        " (weights + grads + optimiser state + transient); activations = the transient part "
        "of forward(+backward). Spry's claim: 1.4-7.1x less peak memory than backprop.",
        "",
        "| model | batch x length | method | trained params | peak | activations | "
        "GFLOP / step | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['batch']} x {r['length']} | {r['method']} | "
            f"{r['trained_params']:,} | {format_bytes(r[key])} | "
            f"{format_bytes(r['activations_bytes'])} | {format_flops(r['flops'])} | "
            f"{r['step_s']:.2f} |"
        )
    out += [
        "",
        "Ratios of peak memory (backprop / Spry; above 1 = Spry uses less):",
        "",
        "| model | batch x length | full / spry | lora / spry | fedfgd / spry |",
        "|---|---|---|---|---|",
    ]
    for r in result["ratios"]:
        cells = " | ".join(f"{r.get(f'{m}/spry', float('nan')):.2f}x" for m in METHODS[:3])
        out.append(f"| {r['model']} | {r['batch']} x {r['length']} | {cells} |")
    out += ["", result["summary"], ""]
    out += [f"Note: {n}" for n in result.get("notes", [])]
    return "\n".join(out) + "\n"


def summary(result: dict[str, Any]) -> str:
    parts = []
    for m in ("full", "lora"):
        values = [r[f"{m}/spry"] for r in result["ratios"] if f"{m}/spry" in r]
        if values:
            parts.append(f"backprop {m} / spry peak memory {min(values):.2f}-{max(values):.2f}x")
    inside = [
        r[f"{m}/spry"] for r in result["ratios"] for m in ("full", "lora") if f"{m}/spry" in r
    ]
    held = sum(1.4 <= v for v in inside)
    return (
        "Measured: " + "; ".join(parts) + f". {held} of {len(inside)} comparisons show at least "
        "the claim's lower end (1.4x)."
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models, small shapes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", help="comma-separated; default minilm-l6,smollm2-135m")
    parser.add_argument("--shapes", help="e.g. 8x64,32x128 (default: per model, see FULL)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", help="output stem (default benchmarks/results/forward_memory)")
    parser.add_argument("--note", action="append", default=[], help="a line for the table")
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else FULL
    models = args.models.split(",") if args.models else list(grid)
    custom = None
    if args.shapes:
        custom = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    args.grid = {m: custom or grid.get(m) or FULL["smollm2-135m"] for m in models}
    args.methods = [m for m in args.methods.split(",") if m]
    if args.out is None:
        stem = "forward_memory" + ("_cuda" if args.device == "cuda" else "")
        args.out = str(RESULTS / (stem + ("_quick" if args.quick else "")))
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.manual_seed(0)
    key = "cuda_peak_bytes" if args.device == "cuda" else "peak_bytes"
    result: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "benchmarks/forward_memory.py", *argv]),
        "device": args.device,
        "peak_key": key,
        "notes": args.note,
        "rows": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for model_name, shapes in args.grid.items():
        for shape in shapes:
            for method in args.methods:
                log(f"{model_name} {shape[0]}x{shape[1]} {method}")
                row = measure(method, model_name, shape, args.device)
                log(f"  peak {format_bytes(row[key])}, {format_flops(row['flops'])}")
                result["rows"].append(row)
                result["ratios"] = ratios(result["rows"], key)
                result["summary"] = summary(result)
                out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
                out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
