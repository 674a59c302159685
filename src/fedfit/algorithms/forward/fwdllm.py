"""FwdLLM (Xu et al. 2023): forward gradients with tangents picked by cosine to the last
global update (package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fedfit.algorithms.base import (
    ClientTask,
    ServerState,
    Update,
)
from fedfit.algorithms.forward.core import (
    Batch,
    draw_tangents,
    forward_gradient,
    select_tangents,
    set_grads,
)
from fedfit.algorithms.forward.fedfgd import FedFGD, ForwardOptions
from fedfit.algorithms.registry import register
from fedfit.config import ConfigError
from fedfit.planning import Plan


@dataclass(frozen=True)
class FwdLLMOptions(ForwardOptions):
    tangents: int = field(default=20, metadata={"help": "tangents used per minibatch (K)"})
    candidates: int = field(
        default=100, metadata={"help": "random tangents scored per minibatch; K best kept"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidates < self.tangents:
            raise ConfigError("method.candidates: must be >= method.tangents")


class FwdLLM(FedFGD):
    """Forward gradients with tangents picked by cosine to the last global update."""

    name = "fwdllm"

    def init(self, model: torch.nn.Module) -> ServerState:
        state = super().init(model)
        state.extra["last_update"] = None
        return state

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        task = super().configure(state, client_id, seed, plan)
        last = state.extra.get("last_update")
        if last is not None:  # the direction crosses the network with the weights
            task.download = {**state.params, **{f"last_update/{n}": t for n, t in last.items()}}
        return task

    def step_fn(
        self, params: dict[str, torch.nn.Parameter], task: ClientTask, generator: torch.Generator
    ) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        opts: FwdLLMOptions = self.options  # type: ignore[assignment]
        shapes = {n: p.shape for n, p in params.items()}
        prefix = "last_update/"
        direction = {n[len(prefix) :]: t for n, t in task.download.items() if n.startswith(prefix)}

        def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            if direction:
                tangents = select_tangents(
                    shapes, direction, opts.candidates, opts.tangents, generator
                )
            else:
                tangents = [draw_tangents(shapes, generator) for _ in range(opts.tangents)]
            loss, estimate, _ = forward_gradient(model, params, batch, tangents)
            set_grads(params, estimate)
            return loss

        return step

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        new = super().aggregate(state, updates)
        new.extra["last_update"] = {n: new.params[n] - state.params[n] for n in state.params}
        return new


register("fwdllm", FwdLLMOptions, "FwdLLM: forward gradients, K tangents picked by cosine")(FwdLLM)
