"""Per-client cost measurement that the engine hands to algorithms as ``ctx.meter``.

Every training step runs for real. A step's cost depends on its kind (backprop, jvp, ...),
the trained tensors, whether optimiser state exists, and its batch shape (batch, tokens); the
meter measures a step with ``costs.measure_step`` (a storage-counting dispatch mode plus
FlopCounterMode) and reuses the figures for later steps of the same everything.

Lengths: padded batches come in many token lengths (max_length of them), and measuring each
would make the meter's cost grow with the data. For one kind, trained set, optimiser state
and batch size, the FLOPs of a step are a quadratic in its token length T (the linear layers
are linear in T, attention quadratic, the head constant) and so are its memory categories
(every tensor's size is such a product). So the meter measures the first ``FIT_POINTS`` (3)
lengths it meets, predicts the next length from the quadratic through them and measures it
too; when that measurement confirms the prediction (FLOPs exactly, every memory figure to
``MEMORY_RTOL``), later lengths are predicted and never instrumented: at most 4 instrumented
steps per (kind, trained set, optimiser state, batch size), whatever the lengths. When it
does not confirm (the zero-order methods' exact-restore corrections vary with the values by
a few hundred bytes), every length of that group stays measured, as before. The first step
of each shape still runs the measurement in each process (each Ray actor, Flower node and
lane has its own meter). ``measured_steps`` / ``measured_s`` per client say how many of its
steps were instrumented and how long they took (their whole wall time, an upper bound on the
meter's cost: an instrumented step costs 1.1-1.4x a plain one on MiniLM).

A step's memory can depend on values, not only shapes, in one case: the zero-order methods'
corrections (above); a cached figure is then the first such step's, within 0.1%.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from fractions import Fraction
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


FIT_POINTS = 3  # lengths measured per group before the next one is predicted (a quadratic)
MEMORY_RTOL = 1e-3  # how close a predicted memory figure must come to the measured one
Cost = tuple[int, StepMemory]


def quadratic_at(points: dict[int, Cost], length: int) -> Cost:
    """FLOPs and memory at ``length`` from the quadratic through ``points`` (Lagrange, in
    exact fractions; rounded to whole FLOPs and bytes)."""
    xs = sorted(points)
    weights = []
    for i, xi in enumerate(xs):
        w = Fraction(1)
        for j, xj in enumerate(xs):
            if j != i:
                w *= Fraction(length - xj, xi - xj)
        weights.append(w)

    def at(values: list[int]) -> int:
        return round(sum(w * v for w, v in zip(weights, values, strict=True)))

    flops = at([points[x][0] for x in xs])
    fields = StepMemory.__dataclass_fields__
    memory = StepMemory(**{f: at([getattr(points[x][1], f) for x in xs]) for f in fields})
    return flops, memory


def confirms(predicted: Cost, measured: Cost) -> bool:
    """FLOPs exactly, every memory figure to MEMORY_RTOL."""
    (pf, pm), (mf, mm) = predicted, measured
    close = all(
        abs(getattr(pm, f) - getattr(mm, f)) <= MEMORY_RTOL * max(1, getattr(mm, f))
        for f in StepMemory.__dataclass_fields__
    )
    return pf == mf and close


@dataclass
class _Lengths:
    """One group's measured lengths, and whether the quadratic through them held."""

    measured: dict[int, Cost] = field(default_factory=dict)
    confirmed: bool | None = None  # None: not tested yet; False: measure every length


class CostMeter:
    """Runs a client's steps; accumulates its FLOPs and keeps its largest step's memory."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Hashable, ...], Cost] = {}
        self._lengths: dict[tuple[Hashable, ...], _Lengths] = {}
        self.start_client()

    def start_client(self) -> None:
        self.flops = 0
        self.memory: StepMemory | None = None
        self.measured_steps = 0
        self.measured_s = 0.0

    def _cost(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: dict[str, torch.Tensor],
        step: StepFn,
        key: tuple[Hashable, ...],
    ) -> tuple[float, Cost]:
        """Run the step; its cost from the cache, the length quadratic, or a measurement."""
        if key in self._cache:
            return run_step(model, optimizer, batch, step), self._cache[key]
        shape = batch["input_ids"].shape
        group = self._lengths.setdefault((*key[1:], shape[0], len(shape)), _Lengths())
        length = int(shape[1]) if len(shape) == 2 else None
        predicted = None
        if length is not None and group.confirmed is not False:
            if len(group.measured) >= FIT_POINTS:
                predicted = quadratic_at(dict(list(group.measured.items())[:FIT_POINTS]), length)
            if group.confirmed:
                self._cache[key] = predicted  # type: ignore[assignment]
                return run_step(model, optimizer, batch, step), self._cache[key]
        t0 = time.perf_counter()
        loss, memory, flops = measure_step(model, optimizer, batch, step)
        self.measured_s += time.perf_counter() - t0
        self.measured_steps += 1
        cost = self._cache[key] = (flops, memory)
        if length is not None:
            group.measured[length] = cost
            if predicted is not None:
                group.confirmed = confirms(predicted, cost)
        return loss, cost

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
        # shares), so the key holds the positions in the model of the tensors that require
        # grad (how deep backward goes) and of those the optimiser steps (a forward-gradient
        # client of Spry steps its share of tensors that all require grad).
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # (and their sizes: SLT narrows blocks to other widths under the same names)
        trainable = tuple(
            (i, p.requires_grad, id(p) in stepped, p.numel())
            for i, p in enumerate(model.parameters())
        )
        # A client's first step creates the optimiser state; later steps carry it through
        # forward and backward, so they peak higher: both kinds are measured.
        # Weights held in another precision (models/precision.py) cost other bytes.
        dtypes = tuple(sorted({str(p.dtype) for p in model.parameters()}))
        shape = tuple(batch["input_ids"].shape)
        key = (shape, trainable, dtypes, skipped is not None, bool(optimizer.state), kind)
        loss, (flops, memory) = self._cost(model, optimizer, batch, step, key)
        if skipped is not None:
            flops, memory = flops + skipped.flops, skipped.add_to(memory)
        self.flops += flops
        if self.memory is None or memory.peak_bytes > self.memory.peak_bytes:
            self.memory = memory
        return loss
