"""FedMeZO: MeZO steps inside FedAvg (docs/methods.md, "Zero-order methods").

Each sampled client starts from the global tensors and runs ``train.local_steps`` MeZO steps
(Malladi et al. 2023): per step, ``perturbations`` (P) seeds, for each the projected gradient
``g_p`` of core.projected_gradient on the same minibatch at the same weights, then
``theta <- theta - (train.lr / P) sum_p g_p z_p``. It uploads its new trainable tensors and the
server averages them as FedAvg does (example-weighted mean, then the server optimiser).

Shared by every ZO method here (:class:`ZeroOrder`):
- ``peft`` picks the trained tensors: ``full`` (every parameter, as in MeZO / FedKSeed /
  DeComFL), or ``lora``, ``bitfit``, ``ia3``, ``head`` through peft.py's ``prepare``.
- The model runs in eval mode (no dropout) during local training, so that L(theta + eps z)
  and L(theta - eps z) are the same deterministic function at two points; dropout noise would
  not cancel in their difference.
- ``train.lr`` is the ZO-SGD step size (MeZO uses 1e-6 .. 1e-7 for full fine-tuning);
  ``train.optimizer`` is not used: the step is plain ZO-SGD, without momentum or decay.
- The step runs through ``ctx.meter`` with an optimiser that does nothing (the step updates
  the tensors itself), so its memory and FLOPs are measured like any other step; the
  measured FLOPs are those of the forward passes (matrix products), as for backprop.
- Everything random derives from ``task.seed``: minibatches and the step seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedfit.algorithms.backprop import NoStepOptimizer
from fedfit.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientTask,
    Update,
    batch_indices,
    load_tensors_,
)
from fedfit.algorithms.peft import LoraOptions, prepare_peft
from fedfit.algorithms.registry import register
from fedfit.algorithms.zeroorder.core import add_noise_, derive, projected_gradient
from fedfit.config import ConfigError
from fedfit.costs.spec import TrainSpec
from fedfit.planning import CostContext

Batch = dict[str, torch.Tensor]
PEFT_CHOICES = ("full", "lora", "bitfit", "ia3", "head")


@dataclass(frozen=True)
class ZOOptions:
    """Options every zero-order method shares."""

    peft: str = field(
        default="full", metadata={"help": "trained tensors: full | lora | bitfit | ia3 | head"}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank (peft = lora)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (peft = lora)"})
    target_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "LoRA/IA3 target modules; empty = the family default"}
    )
    eps: float = field(default=1e-3, metadata={"help": "perturbation scale (MeZO: 1e-3)"})

    def __post_init__(self) -> None:
        if self.peft not in PEFT_CHOICES:
            raise ConfigError(f"method.peft: {self.peft!r} is not one of {', '.join(PEFT_CHOICES)}")
        if not self.eps > 0:
            raise ConfigError("method.eps: must be > 0")
        LoraOptions(r=self.r, alpha=self.alpha)  # same checks as lora's


@dataclass(frozen=True)
class MezoOptions(ZOOptions):
    perturbations: int = field(
        default=1, metadata={"help": "seeds (two forward passes each) per local step (P)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.perturbations < 1:
            raise ConfigError("method.perturbations: must be >= 1")


def trained(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by name, in model order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


StepFactory = Callable[[int], Callable[[torch.nn.Module, Batch], torch.Tensor]]


def metered_steps(
    model: torch.nn.Module,
    shard: ClientData,
    ctx: ClientContext,
    seed: int,
    step_for: StepFactory,
    kind: Any,
) -> list[float]:
    """Run the client's minibatches through the meter; ``step_for(t)`` is step t's callable,
    which updates the tensors itself and returns the loss. Returns the losses."""
    model.eval()  # no dropout: the +/- passes must probe one function (module docstring)
    idle = NoStepOptimizer(list(trained(model).values()))
    losses = []
    for t, index in enumerate(batch_indices(shard, ctx.train, seed)):
        step = step_for(t)
        losses.append(ctx.meter.train_step(model, idle, shard.batch(index), step=step, kind=kind))
    return losses


def loss_of(model: torch.nn.Module, batch: Batch) -> Callable[[], float]:
    """The minibatch loss at the model's current weights, without a graph."""

    def loss() -> float:
        with torch.no_grad():
            return float(model(**batch).loss)

    return loss


def mezo_step(
    params: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[], float],
    seeds: list[int],
    eps: float,
    lr: float,
) -> tuple[list[float], float]:
    """One MeZO step with ``len(seeds)`` perturbations at the same weights, then the update
    ``theta <- theta - lr/P sum g_p z_p``. Returns (the scalars g_p, mean of L+ and L-)."""
    scalars, losses = [], []
    for s in seeds:
        g, plus, minus = projected_gradient(params, s, eps, loss_fn)
        scalars.append(g)
        losses += [plus, minus]
    for s, g in zip(seeds, scalars, strict=True):
        add_noise_(params, s, step_coeff(lr, g, len(seeds)))
    return scalars, float(np.mean(losses))


def step_coeff(lr: float, g: float, count: int) -> float:
    """The coefficient of z in the update of one of ``count`` scalars ``g`` at step size ``lr``
    (one formula for the client's step and every replay of it, so that both agree bit for bit)."""
    return -lr * g / count


class ZeroOrder(Algorithm):
    """FedAvg plumbing for ZO methods: peft choice, cost model, eval-mode local steps."""

    name = "zeroorder"

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        self.task = task
        o: ZOOptions = self.options  # type: ignore[assignment]
        return prepare_peft(o.peft, model, task, self.config, o.r, o.alpha, o.target_modules)

    def spec(self, ctx: CostContext) -> TrainSpec:
        """The PEFT tensors, P perturbations per step, in place (costs/predict.py, section
        Zero order); subclasses say what they upload and replay."""
        o: ZOOptions = self.options  # type: ignore[assignment]
        return TrainSpec(
            o.peft,
            lora_rank=o.r,
            lora_targets=o.target_modules,
            optimizer="sgd",  # the step updates the tensors itself: no optimiser state
            step="zo",
            probes=getattr(o, "perturbations", 1),
        )

    def require_replayable_server(self) -> None:
        """Seed-and-scalar methods rebuild the global model on every device by replaying
        scalars: a server optimiser with state (FedAdam ...) could not be replayed."""
        if self.config.server.optimizer != "fedavg":
            raise ConfigError(
                f"server.optimizer: {self.name} rebuilds the global model from seeds and "
                "scalars; only fedavg (server.lr scales the scalars) can be replayed"
            )

    def step_seeds(self, base: int, t: int, count: int) -> list[int]:
        """The seeds of local step ``t``: independent streams from the client's base seed."""
        return [derive(base, t, p) for p in range(count)]


class FedMeZO(ZeroOrder):
    """MeZO local steps, weights up and down, FedAvg aggregation (module docstring)."""

    name = "fedmezo"

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        opts: MezoOptions = self.options  # type: ignore[assignment]
        load_tensors_(model, task.download)
        params = trained(model)

        def step_for(t: int) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
            def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
                seeds = self.step_seeds(task.seed, t, opts.perturbations)
                _, loss = mezo_step(params, loss_of(model, batch), seeds, opts.eps, ctx.train.lr)
                return torch.tensor(loss)

            return step

        losses = metered_steps(model, shard, ctx, task.seed, step_for, ("mezo", opts.perturbations))
        payload = {n: p.detach().clone() for n, p in params.items()}
        metrics = {"train_loss": float(np.mean(losses)), "steps": float(len(losses))}
        return Update(task.client_id, payload, len(shard), metrics)


register("fedmezo", MezoOptions, "FedMeZO: MeZO zero-order local steps inside FedAvg")(FedMeZO)
