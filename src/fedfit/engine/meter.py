"""Per-client cost measurement that the engine hands to algorithms as ``ctx.meter``.

Every training step runs for real; the first step of each batch shape (batch, tokens) and
trainable set in a run runs under ``costs.measure_step`` (a storage-counting dispatch mode plus FlopCounterMode),
and later steps of the same shape reuse that measurement. FLOPs of a step depend only on its
shapes, and its memory only on its shapes and on the optimiser state (which measure_step
counts whether or not it already exists), so the cached figures are the measured ones; the
cache keeps the overhead of the instrumented step to a handful of steps per run.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

import torch

from fedfit.costs import StepFn, StepMemory, backprop, measure_step, run_step


def plain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    step: StepFn = backprop,
) -> float:
    """One unmeasured step: gradients by ``step`` (backprop by default), optimiser step."""
    return run_step(model, optimizer, batch, step)


class SkippedWork(Protocol):
    flops: int

    def add_to(self, step: StepMemory) -> StepMemory: ...


class CostMeter:
    """Runs a client's steps; accumulates its FLOPs and keeps its largest step's memory."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, ...], tuple[int, StepMemory]] = {}
        self.start_client()

    def start_client(self) -> None:
        self.flops = 0
        self.memory: StepMemory | None = None

    def add_flops(self, flops: int) -> None:
        """For work outside ``train_step`` that an algorithm counted itself."""
        self.flops += flops

    def train_step(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: dict[str, torch.Tensor],
        skipped: SkippedWork | None = None,
        step: StepFn = backprop,
        kind: Hashable = "backprop",
    ) -> float:
        """One real step. ``skipped``: device work the simulation did not run this step (a
        cached frozen prefix); its measured cost is added to the step's. ``step`` computes
        the gradients (forward-gradient and finite-difference methods pass their own) and
        ``kind`` names what decides its cost beyond the shapes (e.g. ``("jvp", tangents)``):
        steps of another kind are measured separately."""
        # Cost depends on the batch shape and on WHICH tensors are trained, not only how many:
        # the lowest trained block decides how deep backward goes (partial training, Spry's
        # shares), so the key holds the trained tensors' positions in the model.
        trainable = tuple(i for i, p in enumerate(model.parameters()) if p.requires_grad)
        # A client's first step creates the optimiser state; later steps carry it through
        # forward and backward, so they peak higher: both kinds are measured.
        key = (
            *batch["input_ids"].shape,
            trainable,
            skipped is not None,
            bool(optimizer.state),
            kind,
        )
        if key in self._cache:
            loss = run_step(model, optimizer, batch, step)
            flops, memory = self._cache[key]
        else:
            loss, memory, flops = measure_step(model, optimizer, batch, step)
            self._cache[key] = (flops, memory)
        if skipped is not None:
            flops, memory = flops + skipped.flops, skipped.add_to(memory)
        self.flops += flops
        if self.memory is None or memory.peak_bytes > self.memory.peak_bytes:
            self.memory = memory
        return loss
