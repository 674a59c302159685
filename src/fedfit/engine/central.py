"""Centralised reference: the same model, method and step budget on the pooled data.

The federated run takes ``rounds * clients_per_round * steps_per_client`` optimiser steps in
all; this trains one model for that many steps of the same batch size, optimiser and learning
rate on the union of the clients' data, with the same trainable tensors (the method's
``prepare``). It is the upper reference a federated run is compared with. It writes a run
folder like a federated run (``runs/NAME-central``) with one row per round-equivalent of
steps, so ``fedfit compare`` overlays it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfit.algorithms.base import ClientData, batch_indices, make_optimizer
from fedfit.config import Config, to_toml
from fedfit.engine.local import ProgressFn, RunExistsError, _append, _summary
from fedfit.engine.meter import CostMeter
from fedfit.engine.setup import build, derive_seed, evaluate


def steps_per_round(config: Config, shards: list[ClientData]) -> int:
    """Optimiser steps the federated run takes per round, summed over its clients."""
    if config.train.local_steps:
        per_client = config.train.local_steps
    else:
        mean_size = float(np.mean([len(s) for s in shards]))
        per_client = max(1, round(config.train.local_epochs * mean_size / config.train.batch_size))
    return per_client * config.data.clients_per_round


def run_central(
    config: Config, *, overwrite: bool = False, progress: ProgressFn | None = None
) -> Path:
    """Train on the pooled data with the federated run's step budget; returns the run folder."""
    config = dataclasses.replace(
        config, run=dataclasses.replace(config.run, name=f"{config.run.name}-central")
    )
    run_dir = Path(config.run.output_dir) / config.run.name
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunExistsError(f"{run_dir} already exists: use --overwrite to replace it")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("rounds.jsonl", "clients.jsonl", "timing.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    (run_dir / "config.toml").write_text(to_toml(config))

    t_start = time.perf_counter()
    setup = build(config)
    first = setup.shards[0]
    pooled = ClientData(
        -1,
        [s for shard in setup.shards for s in shard.seqs],
        None if first.labels is None else np.concatenate([s.labels for s in setup.shards]),
        first.pad_id,
        first.lm,
    )
    per_round = steps_per_round(config, setup.shards)
    chunk = dataclasses.replace(config.train, local_steps=per_round)
    model = setup.model
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config.train)
    meter = CostMeter()
    wall = time.perf_counter() - t_start
    rows: list[dict[str, Any]] = []
    for round_ in range(1, config.run.rounds + 1):
        t0 = time.perf_counter()
        model.train()
        meter.start_client()
        seed = derive_seed(config.run.seed, round_)
        losses = [
            meter.train_step(model, optimizer, pooled.batch(index))
            for index in batch_indices(len(pooled), chunk, seed)
        ]
        row: dict[str, Any] = {
            "round": round_,
            "num_clients": 1,
            "train_loss": float(np.mean(losses)),
            "upload_bytes": 0,
            "download_bytes": 0,
            "client_flops": meter.flops,
            "cum_upload_bytes": 0,
            "cum_download_bytes": 0,
            "cum_client_flops": meter.flops + (rows[-1]["cum_client_flops"] if rows else 0),
        }
        if round_ % config.run.eval_every == 0 or round_ == config.run.rounds:
            row["eval"] = evaluate(model, setup.test, config.train.eval_batch_size)
        wall += time.perf_counter() - t0
        _append(run_dir / "rounds.jsonl", row)
        _append(run_dir / "timing.jsonl", {"round": round_, "wall_s": round(wall, 3)})
        rows.append(row)
        if progress:
            progress(round_, config.run.rounds, row.get("eval"))
    summary = _summary(setup, rows, [], wall)
    summary["method"] = f"central-{config.method.name}"
    summary["steps"] = per_round * config.run.rounds
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir
