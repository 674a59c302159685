"""Spry (Panchal et al., NeurIPS 2024): forward gradients on a per-client share of the
trainable tensors (package docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedfit.algorithms.backprop import NoStepOptimizer
from fedfit.algorithms.base import (
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    Update,
    apply_server_update,
    batch_indices,
)
from fedfit.algorithms.forward.core import (
    Batch,
    draw_tangents,
    forward_gradient,
    parameters_in_order,
)
from fedfit.algorithms.forward.fedfgd import FedFGD, ForwardOptions
from fedfit.algorithms.registry import register
from fedfit.config import ConfigError
from fedfit.costs.predict import CostEstimate
from fedfit.costs.share import assign_groups, tensor_groups  # Spry's split (pure)
from fedfit.costs.spec import TrainSpec
from fedfit.devices import Budget
from fedfit.log import log
from fedfit.planning import CostContext, Plan, check


@dataclass(frozen=True)
class SpryOptions(ForwardOptions):
    share_head: bool = field(
        default=True, metadata={"help": "every client also trains the task head"}
    )
    communication: str = field(
        default="epoch", metadata={"help": "epoch (upload weights) | iteration (jvp scalars)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.communication not in ("epoch", "iteration"):
            raise ConfigError("method.communication: must be 'epoch' or 'iteration'")


class Spry(FedFGD):
    """Forward gradients on a per-client share of the trainable tensors (module docstring)."""

    name = "spry"

    def __init__(self, options: SpryOptions, config: Any) -> None:
        super().__init__(options, config)
        # per iteration the upload is K jvp values, to arrive bit-exact (base.Algorithm)
        self.payload_kind = "scalars" if options.communication == "iteration" else "subset"

    @property
    def _spry(self) -> SpryOptions:
        return self.options  # type: ignore[return-value]

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        model = super().prepare(model, task)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        head = [n for n in trainable if any(h in n for h in ("classifier", "score"))]
        groups = tensor_groups(trainable, head)
        if self._spry.share_head:
            self.shared = head
        else:
            self.shared = []
            if head:
                groups.append(head)
        self.groups = groups
        self.assignment: dict[int, list[str]] = {}
        if self.config.server.optimizer != "fedyogi":
            log(
                f"spry: server optimizer is {self.config.server.optimizer}; the paper's is "
                'fedyogi (server.optimizer = "fedyogi", server.lr = 0.01)'
            )
        return model

    def spec(self, ctx: CostContext, position: int = 0) -> TrainSpec:
        """The share of the client at ``position`` of a round's clients (assign_groups); per
        iteration, its K jvp values are the upload and no optimiser steps on the client."""
        clients = self.config.data.clients_per_round
        return dataclasses.replace(
            super().spec(ctx),
            share=(position, clients),
            share_head=self._spry.share_head,
            upload="jvp" if self._spry.communication == "iteration" else "weights",
        )

    def plan(self, budget: Budget, ctx: CostContext) -> Plan:
        """A device does not know its position in a round, so it is planned for the worst
        share: the most of each predicted cost over the round's positions (the first
        position holds the lowest group, where tangents start, and the most groups; another
        may hold the largest tensors). Per iteration a round is one minibatch."""
        if self._spry.communication == "iteration":
            ctx = dataclasses.replace(ctx, steps=1)
        clients = self.config.data.clients_per_round
        plans = [check(self.spec(ctx, i), budget, ctx) for i in range(clients)]
        estimates = [p.estimate for p in plans if p.estimate is not None]
        worst = CostEstimate(
            *(max(getattr(e, f.name) for e in estimates) for f in dataclasses.fields(CostEstimate))
        )
        flops = max(p.flops_per_round for p in plans)
        ok, reason = budget.fits(
            ctx.padded(worst.peak_bytes), ctx.padded(flops), worst.upload_bytes
        )
        return Plan(ok, reason, plans[0].spec, worst, flops)

    def start_round(self, state: ServerState, clients: Sequence[int]) -> None:
        shares = assign_groups(len(self.groups), len(clients))
        self.assignment = {
            cid: [n for g in share for n in self.groups[g]] + list(self.shared)
            for cid, share in zip(clients, shares, strict=True)
        }
        self.seeds: dict[int, int] = {}

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        if client_id not in self.assignment:
            raise RuntimeError(
                f"spry: client {client_id} has no share this round; the engine must call "
                "start_round(state, clients) before configure"
            )
        task = super().configure(state, client_id, seed, plan)
        task.config["train"] = self.assignment[client_id]
        self.seeds[client_id] = seed  # per-iteration mode regenerates the client's tangents
        return task

    def trained_names(self, model: torch.nn.Module, task: ClientTask) -> list[str]:
        return list(task.config["train"])

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        if self._spry.communication == "epoch":
            return super().client_update(model, task, shard, ctx)
        # per iteration: one minibatch, K jvp values up (the server has the seed)
        params = parameters_in_order(model, self.load_and_select(model, task))
        model.eval()
        shapes = {n: p.shape for n, p in params.items()}
        generator = torch.Generator().manual_seed(task.seed)
        jvps: list[float] = []

        def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            tangents = [draw_tangents(shapes, generator) for _ in range(self.opts.tangents)]
            loss, _, values = forward_gradient(model, params, batch, tangents)
            jvps.extend(values)
            return loss

        index = next(batch_indices(shard, ctx.train, task.seed))
        loss = ctx.meter.train_step(
            model,
            NoStepOptimizer(list(params.values())),
            shard.batch(index),
            step=step,
            kind=("jvp-scalars", self.opts.tangents),
        )
        payload = {"jvp": torch.tensor(jvps, dtype=torch.float32)}
        return Update(task.client_id, payload, len(shard), {"train_loss": loss, "steps": 1.0})

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        if self._spry.communication == "epoch":
            return super().aggregate(state, updates)
        grads = []
        for u in updates:
            names = self.assignment[u.client_id]
            shapes = {n: state.params[n].shape for n in names}
            generator = torch.Generator().manual_seed(self.seeds[u.client_id])
            jvps = u.payload["jvp"].tolist()
            estimate = {n: torch.zeros(s) for n, s in shapes.items()}
            for d in jvps:
                v = draw_tangents(shapes, generator)
                for n in estimate:
                    estimate[n].add_(v[n], alpha=d / len(jvps))
            grads.append(estimate)
        grad = self.combine(state, grads, [u.num_examples for u in updates], gradients=True)
        lr = self.config.train.lr
        target = {n: state.params[n].to(g.dtype) - lr * g for n, g in grad.items()}
        return apply_server_update(state, target, self.config.server)


register("spry", SpryOptions, "Spry: forward gradients, trainable tensors split across clients")(
    Spry
)
