"""Full fine-tuning with backprop: FedAvg and FedSGD.

FedAvg (McMahan et al., AISTATS 2017): each sampled client starts from the global weights,
runs local SGD/AdamW steps on its shard and uploads its new weights; the server takes the
example-weighted mean and moves the global model towards it with the server optimiser
(``server.optimizer = "fedavg"`` and ``server.lr = 1`` is the paper's rule; fedadam, fedyogi
and fedadagrad give FedOpt, Reddi et al. 2021).

FedSGD: each client computes the gradient of its loss over the batches of one local round
(``train.local_steps`` batches, or ``train.local_epochs``) at the global weights, without
stepping, and uploads that gradient. The server moves the global weights by
``-train.lr * (example-weighted mean gradient)`` through the server optimiser, i.e. one SGD
step of size ``train.lr`` on the pooled gradient when the server optimiser is plain fedavg.

FedAvg is the base's defaults (base.Algorithm); the PEFT methods (peft.py) change only
``prepare``: which tensors are trainable, hence trained, uploaded, downloaded and aggregated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedfit.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    Update,
    apply_server_update,
    batch_indices,
    load_tensors_,
)
from fedfit.algorithms.registry import register
from fedfit.costs.spec import TrainSpec
from fedfit.planning import CostContext


@dataclass(frozen=True)
class FullOptions:
    """Full fine-tuning has no method options: every parameter is trained."""


class FedAvg(Algorithm):
    """Local training of the trainable tensors, example-weighted mean, server optimiser:
    exactly the base's defaults (base.Algorithm)."""

    name = "fedavg"


class NoStepOptimizer(torch.optim.Optimizer):
    """An 'optimiser' whose step and zero_grad do nothing: FedSGD accumulates gradients across
    a client's batches with it while each batch still runs through the step meter, and steps
    that update nothing (or update the weights themselves) are metered with it."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


@register("fedsgd", FullOptions, "FedSGD: clients upload one local gradient, full model")
class FedSGD(Algorithm):
    name = "fedsgd"
    payload_kind = "gradient"

    def spec(self, ctx: CostContext) -> TrainSpec:
        return TrainSpec("full", optimizer="sgd")  # gradients only: no optimiser state

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        load_tensors_(model, task.download)
        torch.manual_seed(task.seed)
        model.train()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for p in params.values():
            p.grad = None
        accumulate = NoStepOptimizer(list(params.values()))
        batches = list(batch_indices(shard, ctx.train, task.seed))
        # batch_indices gives equal-size batches and each loss is a batch mean, so the
        # accumulated gradient divided by the number of batches is the mean over examples.
        losses = [ctx.meter.train_step(model, accumulate, shard.batch(index)) for index in batches]
        payload = {
            n: (p.grad / len(batches)).detach().clone()
            if p.grad is not None
            else torch.zeros_like(p)
            for n, p in params.items()
        }
        for p in params.values():
            p.grad = None
        metrics = {"train_loss": float(np.mean(losses)), "steps": float(len(batches))}
        return Update(task.client_id, payload, len(shard), metrics)

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        grad = self.combine(
            state, [u.payload for u in updates], [u.num_examples for u in updates], gradients=True
        )
        lr = self.config.train.lr
        target = {n: state.params[n].to(g.dtype) - lr * g for n, g in grad.items()}
        return apply_server_update(state, target, self.config.server)


register("fedavg", FullOptions, "FedAvg: local backprop training of the full model")(FedAvg)
