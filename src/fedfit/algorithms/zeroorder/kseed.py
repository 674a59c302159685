"""FedKSeed and FedKSeed-Pro (Qin et al., ICML 2024), docs/methods.md.

A pool of K candidate seeds (``num_seeds``, default 4096) is shared by server and devices:
seed k of the pool is ``derive(pool_seed, k)``, so z_k never changes. A local step picks a
pool index k (uniformly; Pro: by the probabilities the server sends), computes the projected
gradient g on its minibatch (core.projected_gradient, ``eps`` default 5e-4 as in FedKSeed's
code) and steps ``theta <- theta - train.lr g z_k`` (the code's lr is 3e-7 for full
fine-tuning). The upload is the step list: an int32 tensor of pool indices and a float32
tensor of scalars, 8 bytes per step (200 steps: 1.6 kB plus the safetensors header).

Server. Per pool index k, ``A_k = sum_c w_c sum_{steps of c at k} g`` with ``w_c`` the
client's share of the round's examples; the new global is the replay of
``theta <- theta - server.lr * train.lr * A_k z_k`` over the used k in increasing order. Since
z_k is fixed, that is the weighted mean of the clients' models (exactly, in real arithmetic).
Only ``server.optimizer = "fedavg"`` can be replayed by devices (``server.lr`` scales).

Download: scalars. z_k being fixed, any span of rounds adds up to ``sum_k C_k z_k`` with C_k the
sum of those rounds' coefficients: the server keeps each round's coefficients and, per device,
the round whose global model it last held (the start of its last round; a device keeps that
model, e.g. it trains a copy), and sends the nonzero C_k since then (int32 index + float32
coefficient: at most K pairs, 32 kB at K = 4096, however long the device was away; a new
device starts from the pretrained model it ships with, round 0). The device replays them:
``2 d`` FLOPs per pair for d trained elements (core.replay_flops), charged to its round.
Summing coefficients over rounds before replaying rounds differently from the server's
round-by-round replay: the rebuilt model agrees with the server's to float32 rounding (tested
to 1e-6). The simulation's one shared model is loaded with the server's global tensors
(``task.config["start"]``, not sent: the device rebuilds them from the download).

FedKSeed-Pro: the server keeps, per pool index, the history of |g| of the scalars uploaded for
it, starting from one 0 as in FedKSeed's code; the probabilities are the softmax of the
per-index mean |g| min-max normalised to [0, 1] (uniform until scalars differ). They travel
with the download (K float32). No clipping of |g| (FedKSeed's code can clip; not implemented).
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
from fedfit.algorithms.zeroorder.core import (
    add_noise_,
    as_float32,
    derive,
    projected_gradient,
    replay_,
    replay_flops,
)
from fedfit.algorithms.zeroorder.mezo import (
    Batch,
    ZeroOrder,
    ZOOptions,
    loss_of,
    metered_steps,
    step_coeff,
    trained,
)
from fedfit.config import ConfigError
from fedfit.costs.spec import TrainSpec
from fedfit.planning import CostContext, Plan


@dataclass(frozen=True)
class KSeedOptions(ZOOptions):
    eps: float = field(default=5e-4, metadata={"help": "perturbation scale (FedKSeed: 5e-4)"})
    num_seeds: int = field(default=4096, metadata={"help": "candidate seeds in the pool (K)"})
    pool_seed: int = field(default=0, metadata={"help": "seed the shared pool derives from"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.num_seeds <= 2**31 - 1:
            raise ConfigError("method.num_seeds: must be in [1, 2^31 - 1]")
        if self.pool_seed < 0:
            raise ConfigError("method.pool_seed: must be >= 0")


def seed_probabilities(abs_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """FedKSeed-Pro: softmax of the min-max normalised mean |g| per pool seed (float64)."""
    amp = abs_sum / count
    span = amp.max() - amp.min()
    normalised = (amp - amp.min()) / span if span > 0 else torch.zeros_like(amp)
    return torch.softmax(normalised, 0)


def catch_up(rounds: Sequence[tuple[torch.Tensor, torch.Tensor]], num_seeds: int) -> Any:
    """The per-index sums of the rounds' coefficients: (int32 indices, float32 coefficients)
    of the nonzero ones, what a device replays to reach the current global model."""
    total = torch.zeros(num_seeds, dtype=torch.float32)
    for index, coeff in rounds:
        total.index_add_(0, index.long(), coeff)
    nonzero = total.nonzero().squeeze(1)
    return nonzero.to(torch.int32), total[nonzero]


class FedKSeed(ZeroOrder):
    """Seeds from a fixed pool, scalars both ways, global model by replay (module docstring)."""

    name = "fedkseed"
    payload_kind = "scalars"
    pro = False

    def __init__(self, options: object, config: Any) -> None:
        super().__init__(options, config)
        self.require_replayable_server()
        opts: KSeedOptions = self.options  # type: ignore[assignment]
        self.pool = [derive(opts.pool_seed, k) for k in range(opts.num_seeds)]

    @property
    def opts(self) -> KSeedOptions:
        return self.options  # type: ignore[return-value]

    def spec(self, ctx: CostContext) -> TrainSpec:
        """One perturbation per step, a pool index and a scalar per step up, and the worst
        catch-up replay: a device away since round 0 replays one pair per pool index used,
        at most every step of every earlier round's clients, at most the pool."""
        run = self.config
        earlier = max(0, run.run.rounds - 1) * run.data.clients_per_round * ctx.steps
        pairs = min(self.opts.num_seeds, earlier)
        return dataclasses.replace(super().spec(ctx), upload="kseed", replay_pairs=pairs)

    def init(self, model: torch.nn.Module) -> ServerState:
        k = self.opts.num_seeds
        extra: dict[str, Any] = {
            "synced": {},  # client id -> round whose global model the device holds
            "rounds": [],  # per finished round: (int32 pool indices, float32 coefficients)
            "abs_sum": torch.zeros(k, dtype=torch.float64),  # Pro: sum of |g| per index
            "count": torch.ones(k, dtype=torch.float64),  # history starts with one 0
        }
        return ServerState(round=0, params=trainable_tensors(model), extra=extra)

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        since = state.extra["synced"].get(client_id, 0)
        index, coeff = catch_up(state.extra["rounds"][since : state.round], self.opts.num_seeds)
        download = {"catch_up_index": index, "catch_up_coeff": coeff}
        if self.pro:
            probs = seed_probabilities(state.extra["abs_sum"], state.extra["count"])
            download["seed_prob"] = probs.to(torch.float32)
        return ClientTask(
            client_id, state.round + 1, seed, download=download, config={"start": state.params}
        )

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        # The device replays the download on the model it holds; the simulation loads the
        # result (the server's global tensors) and charges the replay's compute.
        load_tensors_(model, task.config["start"])
        params = trained(model)
        ctx.meter.add_flops(replay_flops(params, len(task.download["catch_up_index"])))
        rng = np.random.default_rng(task.seed)
        probs = None
        if "seed_prob" in task.download:
            probs = task.download["seed_prob"].to(torch.float64).numpy()
            probs = probs / probs.sum()
        picked: list[int] = []
        scalars: list[float] = []

        def step_for(t: int) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
            def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
                k = int(rng.choice(len(self.pool), p=probs))
                g, plus, minus = projected_gradient(
                    params, self.pool[k], self.opts.eps, loss_of(model, batch)
                )
                add_noise_(params, self.pool[k], step_coeff(ctx.train.lr, g, 1))
                picked.append(k)
                scalars.append(g)
                return torch.tensor((plus + minus) / 2)

            return step

        losses = metered_steps(model, shard, ctx, task.seed, step_for, ("mezo", 1))
        payload = {
            "seed_index": torch.tensor(picked, dtype=torch.int32),
            "scalar": torch.tensor(scalars, dtype=torch.float32),
        }
        metrics = {"train_loss": float(np.mean(losses)), "steps": float(len(losses))}
        return Update(task.client_id, payload, len(shard), metrics)

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        k = self.opts.num_seeds
        total = float(sum(u.num_examples for u in updates))
        summed = torch.zeros(k, dtype=torch.float64)
        abs_sum, count = state.extra["abs_sum"].clone(), state.extra["count"].clone()
        for u in updates:
            index, g = u.payload["seed_index"].long(), u.payload["scalar"].to(torch.float64)
            summed.index_add_(0, index, g * (u.num_examples / total))
            abs_sum.index_add_(0, index, g.abs())
            count.index_add_(0, index, torch.ones_like(g))
        used = summed.nonzero().squeeze(1)
        lr = self.config.server.lr * self.config.train.lr
        coeff = torch.tensor(
            [as_float32(step_coeff(lr, float(summed[i]), 1)) for i in used], dtype=torch.float32
        )
        params = {n: t.clone() for n, t in state.params.items()}
        replay_(params, [self.pool[int(i)] for i in used], coeff.tolist())
        synced = dict(state.extra["synced"])
        for u in updates:
            synced[u.client_id] = state.round  # the device held the global of this round
        extra = {
            **state.extra,
            "synced": synced,
            "rounds": [*state.extra["rounds"], (used.to(torch.int32), coeff)],
            "abs_sum": abs_sum,
            "count": count,
        }
        return ServerState(state.round + 1, params, dict(state.opt_state), extra)


class FedKSeedPro(FedKSeed):
    """FedKSeed with seeds sampled by their importance (module docstring)."""

    name = "fedkseed-pro"
    pro = True


register("fedkseed", KSeedOptions, "FedKSeed: K shared seeds, scalars up and down (ZO)")(FedKSeed)
register("fedkseed-pro", KSeedOptions, "FedKSeed-Pro: FedKSeed, seeds sampled by mean |g|")(
    FedKSeedPro
)
