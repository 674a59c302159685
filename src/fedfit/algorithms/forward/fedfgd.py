"""FedFGD: FedAvg whose local steps use forward gradients on every PEFT tensor; the base
class of the other forward-mode methods (which tensors, which estimator)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedfit.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientTask,
    Update,
    batch_indices,
    load_tensors_,
    make_optimizer,
)
from fedfit.algorithms.forward.core import (
    Batch,
    draw_tangents,
    forward_gradient,
    parameters_in_order,
    set_grads,
)
from fedfit.algorithms.peft import LoraOptions, prepare_peft
from fedfit.algorithms.registry import register
from fedfit.config import ConfigError
from fedfit.costs.spec import TrainSpec
from fedfit.planning import CostContext

PEFT = ("lora", "bitfit", "ia3", "head")  # the backbone stays frozen: no "full"


@dataclass(frozen=True)
class ForwardOptions:
    peft: str = field(
        default="lora", metadata={"help": "trained tensors: lora | bitfit | ia3 | head"}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank (peft = lora)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (peft = lora)"})
    target_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "LoRA/IA3 target modules; empty = the family default"}
    )
    tangents: int = field(default=1, metadata={"help": "tangents averaged per minibatch"})

    def __post_init__(self) -> None:
        if self.peft not in PEFT:
            raise ConfigError(f"method.peft: {self.peft!r} is not one of {', '.join(PEFT)}")
        if self.tangents < 1:
            raise ConfigError("method.tangents: must be >= 1")
        LoraOptions(r=self.r, alpha=self.alpha)  # same checks as lora's


class FedFGD(Algorithm):
    """FedAvg whose local steps use forward gradients (every trainable tensor)."""

    name = "fedfgd"

    @property
    def opts(self) -> ForwardOptions:
        return self.options  # type: ignore[return-value]

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        o = self.opts
        return prepare_peft(o.peft, model, task, self.config, o.r, o.alpha, o.target_modules)

    def spec(self, ctx: CostContext) -> TrainSpec:
        """The PEFT tensors, K tangents per step (costs/predict.py, section Forward mode)."""
        o = self.opts
        return TrainSpec(
            o.peft,
            lora_rank=o.r,
            lora_targets=o.target_modules,
            optimizer=ctx.optimizer,
            step=self.step_kind()[0],
            probes=o.tangents,
        )

    # -- the client side: which tensors, which estimator

    def trained_names(self, model: torch.nn.Module, task: ClientTask) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]

    def load_and_select(self, model: torch.nn.Module, task: ClientTask) -> list[str]:
        """Load the downloaded weights (not the extras, whose names hold a '/'), and return
        the names this client trains, in the order its tangents are drawn."""
        load_tensors_(model, {n: t for n, t in task.download.items() if "/" not in n})
        return self.trained_names(model, task)

    def step_fn(
        self, params: dict[str, torch.nn.Parameter], task: ClientTask, generator: torch.Generator
    ) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        shapes = {n: p.shape for n, p in params.items()}

        def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            tangents = [draw_tangents(shapes, generator) for _ in range(self.opts.tangents)]
            loss, estimate, _ = forward_gradient(model, params, batch, tangents)
            set_grads(params, estimate)
            return loss

        return step

    def step_kind(self) -> tuple[str, int]:
        """The meter's kind of step; its first item is TrainSpec's ``step``."""
        return ("jvp", self.opts.tangents)

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        names = self.load_and_select(model, task)
        params = parameters_in_order(model, names)
        model.eval()  # dropout off: module docstring
        optimizer = make_optimizer(list(params.values()), ctx.train)
        step = self.step_fn(params, task, torch.Generator().manual_seed(task.seed))
        losses = [
            ctx.meter.train_step(
                model, optimizer, shard.batch(index), step=step, kind=self.step_kind()
            )
            for index in batch_indices(shard, ctx.train, task.seed)
        ]
        payload = {n: p.detach().clone() for n, p in params.items()}
        metrics = {"train_loss": float(np.mean(losses)), "steps": float(len(losses))}
        return Update(task.client_id, payload, len(shard), metrics)


register("fedfgd", ForwardOptions, "FedFGD: FedAvg with forward-gradient (jvp) local steps, PEFT")(
    FedFGD
)
