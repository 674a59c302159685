"""DeComFL (Li et al., 2024): dimension-free communication, seeds and scalars both ways.

Per round the server draws one base seed (from the run seed and the round) and sends it; every
client of the round uses the same step seeds ``derive(base, t, p)`` for local step t and
perturbation p < P (``perturbations``, 5 in the paper's OPT-125m / SST-2 setting, with eps 1e-3
and lr 1e-5). A step is MeZO with P perturbations at the same weights:
``theta <- theta - (train.lr / P) sum_p g_{t,p} z_{t,p}``. The upload is the scalars alone, a
float32 tensor [steps, P]: the server knows the seeds.

Server: per (t, p), the example-weighted mean of the clients' g over the clients that ran step t
(clients with fewer local steps, under ``train.local_epochs``, leave later steps to the others),
then the new global is the replay of those means with the round's seeds, each scaled by
``server.lr`` (only ``server.optimizer = "fedavg"`` can be replayed by devices). With equal
step counts this is exactly the weighted mean of the client models in real arithmetic.

Download: the base seed of the round, and the history the device missed: per round since the
global model it last held (the start of its last round; round 0, the pretrained model, for a
new device) that round's base seed, step count and mean scalars. The device replays them in
order, bit for bit the server's own replay (``2 d`` FLOPs per pair, core.replay_flops, charged
to its round). The history grows with the rounds a device misses (P x steps floats per round);
``max_catch_up`` bounds it: a device with more pairs to replay downloads the global tensors
instead (and replays nothing). The simulation's shared model is loaded with the server's
global tensors either way (``task.config["start"]``, not sent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedfit.algorithms.base import (
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    Update,
    load_tensors_,
    trainable_tensors,
)
from fedfit.algorithms.registry import register
from fedfit.algorithms.zeroorder.core import derive, replay_, replay_flops
from fedfit.algorithms.zeroorder.mezo import (
    Batch,
    ZeroOrder,
    ZOOptions,
    loss_of,
    metered_steps,
    mezo_step,
    step_coeff,
    trained,
)
from fedfit.config import ConfigError
from fedfit.costs.spec import TrainSpec
from fedfit.planning import CostContext, Plan


@dataclass(frozen=True)
class DeComFLOptions(ZOOptions):
    perturbations: int = field(default=5, metadata={"help": "perturbations per local step (P)"})
    max_catch_up: int = field(
        default=0,
        metadata={"help": "most (seed, scalar) pairs a device replays; beyond: weights; 0 = any"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.perturbations < 1:
            raise ConfigError("method.perturbations: must be >= 1")
        if self.max_catch_up < 0:
            raise ConfigError("method.max_catch_up: must be >= 0 (0 = no bound)")


def round_pairs(base: int, scalars: torch.Tensor, lr: float) -> tuple[list[int], list[float]]:
    """The (seed, coefficient) pairs of one round's [steps, P] mean scalars, in replay order."""
    steps, count = scalars.shape
    seeds = [derive(base, t, p) for t in range(steps) for p in range(count)]
    coeffs = [step_coeff(lr, float(g), count) for g in scalars.reshape(-1)]
    return seeds, coeffs


def weighted_step_means(updates: Sequence[Update]) -> torch.Tensor:
    """Per (step, perturbation), the example-weighted mean scalar over the clients that ran
    that step, as float32 [most steps, P]."""
    longest = max(u.payload["scalar"].shape[0] for u in updates)
    count = updates[0].payload["scalar"].shape[1]
    sums = torch.zeros(longest, count, dtype=torch.float64)
    weights = torch.zeros(longest, 1, dtype=torch.float64)
    for u in updates:
        g = u.payload["scalar"].to(torch.float64)
        sums[: len(g)] += u.num_examples * g
        weights[: len(g)] += u.num_examples
    return (sums / weights).to(torch.float32)


class DeComFL(ZeroOrder):
    """Shared per-round seeds, scalars both ways, global model by replay (module docstring)."""

    name = "decomfl"
    payload_kind = "scalars"
    # every client of a round perturbs along the same seeds, so the scalars of one (step,
    # perturbation) can be combined across clients by a robust rule
    combines_scalars = True

    def __init__(self, options: object, config: Any) -> None:
        super().__init__(options, config)
        self.require_replayable_server()

    @property
    def opts(self) -> DeComFLOptions:
        return self.options  # type: ignore[return-value]

    @property
    def replay_lr(self) -> float:
        return self.config.server.lr * self.config.train.lr

    def spec(self, ctx: CostContext) -> TrainSpec:
        """P perturbations per step, the [steps, P] scalars up, and the worst catch-up: a
        device away since round 0 replays every earlier round's steps x P pairs (none past
        ``max_catch_up``, where it downloads the weights instead)."""
        pairs = max(0, self.config.run.rounds - 1) * ctx.steps * self.opts.perturbations
        if self.opts.max_catch_up and pairs > self.opts.max_catch_up:
            pairs = self.opts.max_catch_up
        return dataclasses.replace(super().spec(ctx), upload="decomfl", replay_pairs=pairs)

    def base_seed(self, round_: int) -> int:
        return derive(self.config.run.seed, round_)

    def init(self, model: torch.nn.Module) -> ServerState:
        # rounds: per finished round, (base seed, float32 [steps, P] mean scalars)
        extra: dict[str, Any] = {"synced": {}, "rounds": []}
        return ServerState(round=0, params=trainable_tensors(model), extra=extra)

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        since = state.extra["synced"].get(client_id, 0)
        missed = state.extra["rounds"][since : state.round]
        pairs = sum(s.numel() for _, s in missed)
        download: dict[str, torch.Tensor] = {
            "base_seed": torch.tensor([self.base_seed(state.round + 1)], dtype=torch.int64)
        }
        if self.opts.max_catch_up and pairs > self.opts.max_catch_up:
            download.update(state.params)  # cheaper to send the weights than the history
        elif missed:
            download["history_seed"] = torch.tensor([b for b, _ in missed], dtype=torch.int64)
            download["history_steps"] = torch.tensor(
                [s.shape[0] for _, s in missed], dtype=torch.int32
            )
            download["history_scalar"] = torch.cat([s.reshape(-1) for _, s in missed])
        return ClientTask(
            client_id, state.round + 1, seed, download=download, config={"start": state.params}
        )

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        load_tensors_(model, task.config["start"])  # = the device's replay of the history
        params = trained(model)
        ctx.meter.add_flops(replay_flops(params, len(task.download.get("history_scalar", []))))
        base = int(task.download["base_seed"][0])
        count = self.opts.perturbations
        rows: list[list[float]] = []

        def step_for(t: int) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
            def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
                seeds = [derive(base, t, p) for p in range(count)]
                scalars, loss = mezo_step(
                    params, loss_of(model, batch), seeds, self.opts.eps, ctx.train.lr
                )
                rows.append(scalars)
                return torch.tensor(loss)

            return step

        losses = metered_steps(model, shard, ctx, task.seed, step_for, ("mezo", count))
        payload = {"scalar": torch.tensor(rows, dtype=torch.float32).reshape(-1, count)}
        metrics = {"train_loss": float(np.mean(losses)), "steps": float(len(losses))}
        return Update(task.client_id, payload, len(shard), metrics)

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        means = self.step_scalars(state, updates)
        base = self.base_seed(state.round + 1)
        params = {n: t.clone() for n, t in state.params.items()}
        replay_(params, *round_pairs(base, means, self.replay_lr))
        synced = dict(state.extra["synced"])
        for u in updates:
            synced[u.client_id] = state.round
        extra = {
            **state.extra,
            "synced": synced,
            "rounds": [*state.extra["rounds"], (base, means)],
        }
        return ServerState(state.round + 1, params, dict(state.opt_state), extra)

    def step_scalars(self, state: ServerState, updates: Sequence[Update]) -> torch.Tensor:
        """The round's scalar per (step, perturbation): the example-weighted mean, or with
        ``server.aggregation`` / ``server.clip_norm`` set, that rule across the clients that
        ran the step (each client's scalars clipped as one vector)."""
        server = self.config.server
        if server.aggregation == "mean" and not server.clip_norm:
            return weighted_step_means(updates)
        combined = self.combine(
            state, [per_step(u) for u in updates], [u.num_examples for u in updates], True
        )
        return torch.stack([combined[str(i)] for i in range(len(combined))]).to(torch.float32)


def per_step(update: Update) -> dict[str, torch.Tensor]:
    """A client's scalars as one tensor per local step (the P scalars of that step)."""
    return {str(i): row for i, row in enumerate(update.payload["scalar"])}


def replay_history(
    params: dict[str, torch.Tensor], download: dict[str, torch.Tensor], lr: float, count: int
) -> int:
    """What a device does with a download: replay every missed round in order; returns the
    number of pairs replayed. ``lr`` = server.lr * train.lr, ``count`` = P."""
    if "history_seed" not in download:
        return 0
    scalars = download["history_scalar"].reshape(-1, count)
    start = 0
    for base, steps in zip(
        download["history_seed"].tolist(), download["history_steps"].tolist(), strict=True
    ):
        replay_(params, *round_pairs(int(base), scalars[start : start + steps], lr))
        start += steps
    return int(scalars.numel())


register("decomfl", DeComFLOptions, "DeComFL: shared seeds, scalars up and down (ZO)")(DeComFL)
