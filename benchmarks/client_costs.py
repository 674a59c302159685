"""Measured cost of one client update per method, side by side, on one model.

    .venv/bin/python benchmarks/client_costs.py [--model minilm-l6] [--batch 16] [--length 64]

For each registered backprop method: one client update of ``--steps`` steps of a fixed
batch shape (real tweets, truncated/padded to exactly --length tokens so every method sees
the same shapes), measured by the engine's own CostMeter (memory by category, FLOPs), the
serialised upload and download payloads, and wall time per step. Ratios are against
full fine-tuning (fedavg) measured in the same run. Writes benchmarks/results/client_costs.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedfit.algorithms import ALGORITHMS, make_algorithm
from fedfit.algorithms.base import ClientContext, ClientData
from fedfit.config import load_config
from fedfit.data import load_dataset, tokenize
from fedfit.engine.meter import CostMeter
from fedfit.models import load_model
from fedfit.payload import payload_bytes

RESULTS = Path(__file__).parent / "results"
METHODS = ("fedavg", "fedsgd", "lora", "ia3", "bitfit", "head")


def fixed_length_shard(model_name: str, batch: int, length: int) -> tuple[ClientData, int]:
    """``batch`` real tweets, each at least ``length`` tokens (repeated text if shorter)."""
    ds = load_dataset("tweets")
    _, tokenizer = load_model(model_name, "classification", num_labels=3)
    seqs = tokenize(ds.train_texts[: batch * 4], tokenizer, 4 * length)
    fixed = [np.resize(s, length).astype(np.int32) for s in seqs[:batch]]
    labels = np.asarray(ds.train_labels[:batch])
    return ClientData(0, fixed, labels, int(tokenizer.pad_token_id), lm=False), len(ds.label_names)


def measure(method: str, model_name: str, shard: ClientData, steps: int, batch: int) -> dict:
    config = load_config(
        None,
        [
            f"method.name={method}",
            f"model.name={model_name}",
            f"train.local_steps={steps}",
            f"train.batch_size={batch}",
        ],
    )
    model, _ = load_model(model_name, "classification", num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "classification")
    state = algorithm.init(model)
    task = algorithm.configure(state, 0, seed=1)
    meter = CostMeter()
    ctx = ClientContext(train=config.train, meter=meter)
    t0 = time.perf_counter()
    update = algorithm.client_update(model, task, shard, ctx)
    wall = time.perf_counter() - t0
    flops, memory = meter.flops, meter.memory
    # The first step ran instrumented; time the plain ones separately as well.
    meter.start_client()
    t1 = time.perf_counter()
    algorithm.client_update(model, task, shard, ctx)
    plain = (time.perf_counter() - t1) / steps
    mem = memory.as_dict() if memory else {}
    return {
        "method": method,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops_per_step": flops // steps,
        "upload_bytes": payload_bytes(update.payload),
        "download_bytes": payload_bytes(task.download),
        "memory": mem,
        "step_s": round(plain, 4),
        "first_update_s": round(wall, 3),
    }


def markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    base = next(r for r in rows if r["method"] == "fedavg")
    mb = 1e6
    out = [
        f"# Client update cost per method: {args.model}, batch {args.batch} x {args.length} tokens",
        "",
        f"Command: `{command}`",
        "",
        "Measured with the engine's CostMeter (storage-counting dispatch mode and "
        "FlopCounterMode); bytes = serialised payload. Ratios are fedavg / method, same run.",
        "",
        "| method | trainable | peak MB | weights | grads | optim | activations | "
        "GFLOP/step | upload MB | s/step | peak ratio | upload ratio | time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["memory"]
        out.append(
            f"| {r['method']} | {r['trainable_params']:,} | {m['peak_bytes'] / mb:.1f} | "
            f"{m['weights_bytes'] / mb:.1f} | {m['grads_bytes'] / mb:.1f} | "
            f"{m['optimizer_bytes'] / mb:.1f} | {m['activations_bytes'] / mb:.1f} | "
            f"{r['flops_per_step'] / 1e9:.1f} | {r['upload_bytes'] / mb:.3f} | {r['step_s']:.3f} | "
            f"{base['memory']['peak_bytes'] / m['peak_bytes']:.2f}x | "
            f"{base['upload_bytes'] / r['upload_bytes']:.0f}x | "
            f"{base['step_s'] / r['step_s']:.2f}x |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "client_costs"))
    args = parser.parse_args()
    torch.manual_seed(0)
    shard, _ = fixed_length_shard(args.model, args.batch, args.length)
    rows = []
    for method in METHODS:
        if method not in ALGORITHMS:
            continue
        rows.append(measure(method, args.model, shard, args.steps, args.batch))
        print(json.dumps(rows[-1]))
    command = (
        f".venv/bin/python benchmarks/client_costs.py --model {args.model} "
        f"--batch {args.batch} --length {args.length} --steps {args.steps}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "args": vars(args), "rows": rows}, indent=2) + "\n"
    )
    out.with_suffix(".md").write_text(markdown(rows, args, command))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
