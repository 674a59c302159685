"""Centralised reference: the same model, method and step budget on the pooled data.

The federated run takes ``rounds * clients_per_round * steps_per_client`` optimiser steps in
all; this trains one model for that many steps of the same batch size, optimiser and learning
rate on the union of the clients' data, with the same trainable tensors (the method's
``prepare``). It is the upper reference a federated run is compared with. It writes a run
folder like a federated run (``runs/NAME-central``) with one row per round-equivalent of
steps, so ``fedfit compare`` overlays it, and a round 0 with the starting model's evaluation
(after the class-mean head when ``model.head_init = "ncm"``, from the same round-0 clients).

Backprop methods train with backprop on the pooled data (one optimiser for the whole run).
Gradient-free methods (forward gradients, finite differences, zero-order) use their own
estimator instead, so a ZO config has a ZO reference: each round-equivalent is one
``client_update`` of a single client holding the pooled data, folded in by the method's
``aggregate``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfit.algorithms.base import (
    ClientContext,
    ClientData,
    ServerState,
    batch_indices,
    client_steps,
    load_tensors_,
    make_optimizer,
)
from fedfit.config import Config, TrainConfig
from fedfit.engine.meter import CostMeter
from fedfit.engine.runfolder import ROUNDS, TIMING, RunExistsError, RunFolder
from fedfit.engine.seeds import derive_seed
from fedfit.engine.server import ProgressFn, round0_clients, summarize
from fedfit.engine.setup import RunSetup, build, evaluate


def steps_per_round(config: Config, shards: list[ClientData]) -> int:
    """Optimiser steps the federated run takes per round, summed over its clients: the
    clients' mean ``client_steps`` times the clients per round."""
    mean = float(np.mean([client_steps(config.train, len(s)) for s in shards]))
    return max(1, round(mean * config.data.clients_per_round))


def own_estimator(setup: RunSetup) -> bool:
    """Gradient-free methods (forward gradients, finite differences, zero-order) are their
    own reference: their centralised run uses their estimator, not backprop."""
    from fedfit.algorithms.forward.fedfgd import FedFGD
    from fedfit.algorithms.zeroorder.mezo import ZeroOrder

    return isinstance(setup.algorithm, FedFGD | ZeroOrder)


def _estimator_chunk(
    setup: RunSetup,
    state: ServerState,
    pooled: ClientData,
    chunk: TrainConfig,
    meter: CostMeter,
    round_: int,
    seed: int,
) -> tuple[ServerState, list[float]]:
    """``per_round`` steps of the method's own estimator: one ``client_update`` of a single
    client holding the pooled data, folded in by the method's ``aggregate`` (one update: the
    server optimiser of the config sees exactly that client's change). The optimiser state of
    the steps restarts with each chunk, as in every client update."""
    algorithm = setup.algorithm
    algorithm.start_round(state, [pooled.client_id])
    task = algorithm.configure(state, pooled.client_id, seed, setup.plans[0])
    ctx = ClientContext(train=chunk, meter=meter)
    update = algorithm.client_update(setup.model, task, pooled, ctx)
    state = algorithm.aggregate(state, [update])
    steps = int(update.metrics.get("steps", 0))
    return state, [float(update.metrics.get("train_loss", np.nan))] * steps


def central_config(config: Config) -> Config:
    """The federated run's config for its centralised reference: run name ``NAME-central``."""
    return dataclasses.replace(
        config, run=dataclasses.replace(config.run, name=f"{config.run.name}-central")
    )


def run_central(
    config: Config, *, overwrite: bool = False, progress: ProgressFn | None = None
) -> Path:
    """Train on the pooled data with the federated run's step budget; returns the run folder."""
    config = central_config(config)
    with RunFolder.of(config).lock() as folder:
        if folder.path.exists() and any(folder.path.iterdir()) and not overwrite:
            raise RunExistsError(f"{folder.path} already exists: use --overwrite to replace it")
        RunFolder.prepare(config, resume=False, overwrite=True)
        return _run_central(config, folder, progress)


def _run_central(config: Config, folder: RunFolder, progress: ProgressFn | None) -> Path:

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
    estimator = own_estimator(setup)
    state: ServerState | None = setup.algorithm.init(model)
    if config.model.head_init == "ncm":  # the same start as the federated run: class means
        from fedfit.engine.head_init import ncm_round

        assert state is not None
        state = ncm_round(setup, state, round0_clients(setup))[0]
        load_tensors_(model, state.params)
    state = state if estimator else None
    wall = time.perf_counter() - t_start
    rows: list[dict[str, Any]] = []
    steps_taken = 0
    start = evaluate(model, setup.test, config.train.eval_batch_size)
    if setup.prior_loss is not None:
        start["prior_loss"] = setup.prior_loss
    rows.append(
        {"round": 0, "num_clients": 0, "train_loss": None, "upload_bytes": 0,
         "download_bytes": 0, "client_flops": 0, "cum_upload_bytes": 0,
         "cum_download_bytes": 0, "cum_client_flops": 0, "eval": start}
    )  # fmt: skip
    folder.append(ROUNDS, rows[0])
    for round_ in range(1, config.run.rounds + 1):
        t0 = time.perf_counter()
        model.train()
        meter.start_client()
        seed = derive_seed(config.run.seed, round_)
        if state is not None:
            state, losses = _estimator_chunk(setup, state, pooled, chunk, meter, round_, seed)
        else:
            losses = [
                meter.train_step(model, optimizer, pooled.batch(index))
                for index in batch_indices(pooled, chunk, seed)
            ]
        steps_taken += len(losses)
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
            if state is not None:
                load_tensors_(model, state.params)
            row["eval"] = evaluate(model, setup.test, config.train.eval_batch_size)
            if setup.prior_loss is not None:
                row["eval"]["prior_loss"] = setup.prior_loss
        wall += time.perf_counter() - t0
        folder.append(ROUNDS, row)
        folder.append(TIMING, {"round": round_, "wall_s": round(wall, 3)})
        rows.append(row)
        if progress:
            progress(round_, config.run.rounds, row.get("eval"))
    summary = summarize(setup, rows, [], wall)
    summary["method"] = f"central-{config.method.name}"
    # the steps taken (a per-iteration Spry client update is one minibatch, whatever the budget)
    summary["steps"] = steps_taken
    summary["estimator"] = (
        "the method's own (one client on the pooled data)" if estimator else ("backprop")
    )
    folder.write_summary(summary)
    return folder.path
