"""The client side of a round, the same on every executor.

``run_client`` is one client's round on whichever process holds a model: ``client_update``
measured by the cost meter, then the upload through the channel (real serialisation: its
byte count is the upload, and the server only ever sees the deserialised copy). The local
executor runs every client through it on the one shared model; a process of its own (a Ray
actor, a Flower node) holds a ``ClientSide``: its own setup built from the run's config.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedfit.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    Update,
)
from fedfit.attack import Attack
from fedfit.config import Config
from fedfit.engine.channel import Channel
from fedfit.engine.meter import CostMeter
from fedfit.engine.setup import RunSetup, build, model_fingerprint


@dataclass
class ClientResult:
    """What the client side of one client's round hands back to the server: the update as
    the server receives it (after the channel) and the measured part of its clients.jsonl row
    (num_examples, steps, train_loss, upload_bytes, flops, peak_memory_bytes, memory, wall_s,
    and the cost meter's measured_steps and measured_s)."""

    update: Update
    row: dict[str, Any]


# The measured part of a clients.jsonl row of a client that did no work (it dropped out).
NO_WORK: dict[str, Any] = {
    "num_examples": 0,
    "steps": 0,
    "train_loss": None,
    "upload_bytes": 0,
    "flops": 0,
    "peak_memory_bytes": None,
}

# The client side of a round: (state, the round's clients, their tasks) -> results in order.
ClientRunner = Callable[[ServerState, list[int], list[ClientTask]], list[ClientResult]]


def run_client(
    algorithm: Algorithm,
    model: torch.nn.Module,
    task: ClientTask,
    shard: ClientData,
    channel: Channel,
    ctx: ClientContext,
    meter: CostMeter,
    attack: Attack | None = None,
) -> ClientResult:
    """Client side of one client's round, on whichever process holds ``model``:
    ``client_update`` measured by ``meter``, then the upload through the channel (the update's
    payload becomes what the server receives). Every executor runs every client through this.
    A simulated attacker (``attack``, fedfit/attack.py) corrupts its update before the upload."""
    meter.start_client()
    t0 = time.perf_counter()
    error = None
    attacks = attack is not None and task.client_id in attack
    try:
        update = algorithm.client_update(model, task, shard, ctx)
        if attack is not None and attacks:
            update = attack.corrupt(update, task, algorithm.payload_kind)
    except Exception as err:  # a failing device drops out of the round; the run goes on
        error = f"{type(err).__name__}: {err}"
        update = Update(task.client_id, {}, 0, {})
    wall = time.perf_counter() - t0
    upload_bytes = channel.upload(update, task) if error is None else 0
    memory = meter.memory.as_dict() if meter.memory else {}
    row: dict[str, Any] = {
        "num_examples": update.num_examples,
        "steps": int(update.metrics.get("steps", 0)),
        "train_loss": update.metrics.get("train_loss"),
        "upload_bytes": upload_bytes,
        "flops": meter.flops,
        "peak_memory_bytes": memory.get("peak_bytes"),
        "memory": memory,
        "wall_s": round(wall, 4),
        "measured_steps": meter.measured_steps,
        "measured_s": round(meter.measured_s, 4),
    }
    if attack is not None and attacks:
        row["attack"] = attack.kind
    if error is not None:
        row["error"] = error
    return ClientResult(update, row)


def run_tasks(
    setup: RunSetup, tasks: list[ClientTask], ctx: ClientContext, meter: CostMeter
) -> list[ClientResult]:
    """``run_client`` for each task, one after another, on ``setup``'s one model."""
    return [
        run_client(
            setup.algorithm,
            setup.model,
            task,
            setup.shards[task.client_id],
            setup.channel,
            ctx,
            meter,
            setup.attack,
        )
        for task in tasks
    ]


def in_process(setup: RunSetup, meter: CostMeter) -> ClientRunner:
    """Every client on ``setup``'s one shared model, in order (the local executor)."""
    ctx = ClientContext(train=setup.config.train, meter=meter)

    def run_clients(
        state: ServerState, clients: list[int], tasks: list[ClientTask]
    ) -> list[ClientResult]:
        return run_tasks(setup, tasks, ctx, meter)

    return run_clients


def worker_threads(config: Config) -> int:
    """Torch threads of a process that runs clients beside others (a Ray actor, a Flower
    node): ``run.threads``, or 1 when it is 0 (torch's default, all cores, would
    oversubscribe)."""
    return config.run.threads or 1


@dataclass
class ClientSide:
    """The client side of a run in a process of its own (a Ray actor, a Flower node): its own
    RunSetup built from the run's config (model loaded once, shards, the algorithm prepared
    under the run seed), a meter, and the model's fingerprint for the server to compare."""

    setup: RunSetup
    ctx: ClientContext
    meter: CostMeter
    fingerprint: str

    @classmethod
    def build(cls, config: Config) -> ClientSide:
        threads = worker_threads(config)
        torch.set_num_threads(threads)
        # build() logs client exclusions that the server already logs once.
        with contextlib.redirect_stderr(io.StringIO()):
            setup = build(config)
        torch.set_num_threads(threads)
        meter = CostMeter()
        ctx = ClientContext(train=config.train, meter=meter)
        return cls(setup, ctx, meter, model_fingerprint(setup.model))

    def run(
        self, state: ServerState, clients: list[int], tasks: list[ClientTask]
    ) -> list[ClientResult]:
        """``tasks`` (some of the round ``clients``' tasks), one after another: the
        algorithm is told the whole round first (Spry and partial training assign shares)."""
        self.setup.algorithm.start_round(state, clients)
        self.setup.channel.start_round()
        return run_tasks(self.setup, tasks, self.ctx, self.meter)
