"""Baffle (Feng et al. 2023): FedAvg with central finite-difference local steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedfit.algorithms.base import (
    ClientTask,
)
from fedfit.algorithms.forward.core import (
    Batch,
    draw_tangents,
    finite_difference_gradient,
    set_grads,
)
from fedfit.algorithms.forward.fedfgd import FedFGD, ForwardOptions
from fedfit.algorithms.registry import register
from fedfit.config import ConfigError


@dataclass(frozen=True)
class BaffleOptions(ForwardOptions):
    tangents: int = field(default=20, metadata={"help": "perturbations per minibatch (K)"})
    sigma: float = field(default=1e-4, metadata={"help": "finite-difference step"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma <= 0:
            raise ConfigError("method.sigma: must be > 0")


class Baffle(FedFGD):
    """FedAvg whose local steps use central finite differences (module docstring)."""

    name = "baffle"

    def step_fn(
        self, params: dict[str, torch.nn.Parameter], task: ClientTask, generator: torch.Generator
    ) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        opts: BaffleOptions = self.options  # type: ignore[assignment]
        shapes = {n: p.shape for n, p in params.items()}

        def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            tangents = [draw_tangents(shapes, generator) for _ in range(opts.tangents)]
            loss, estimate = finite_difference_gradient(model, params, batch, tangents, opts.sigma)
            set_grads(params, estimate)
            return loss

        return step

    def step_kind(self) -> tuple[str, int]:
        return ("fd", self.opts.tangents)


register("baffle", BaffleOptions, "Baffle: central finite differences with K perturbations")(Baffle)
