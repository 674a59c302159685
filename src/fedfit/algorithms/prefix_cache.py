"""Frozen-prefix cache for layer fine-tuning in simulation (docs/architecture.md).

When no device of the population trains the blocks below ``k`` (the deepest plan trains the
top ``L - k``), the embeddings and blocks ``[0, k)`` never change, and neither does their
output for a given example. The cache runs them once per example (eval mode, no grad) and
stores the hidden states at the input of block ``k``, unpadded; later steps replay them: the
model's embedding module is swapped for one that returns the cached (padded) states and the
block list for blocks ``[k, L)`` only, so the prefix is skipped.

The device still runs the prefix, so its cost is added back honestly: the prefix's forward
FLOPs and its transient memory are measured (once per batch shape, on a real forward of
that shape) and its weights counted, and the step's reported figures are those of the whole
device step. Results equal the uncached run up to float summation order (the cached states
were computed in a batch with another padding length): tested to 1e-5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedfit.algorithms.base import ClientData
from fedfit.costs import MemoryTracker, StepMemory
from fedfit.models.structure import embeddings, hidden_states_at, swapped, transformer_layers


@dataclass(frozen=True)
class PrefixCost:
    """What the skipped prefix costs the device per step of one batch shape."""

    flops: int
    transient_bytes: int  # peak of the prefix forward's allocations (inference, no grad)
    weights_bytes: int  # parameters and buffers of the embeddings and blocks [0, k)

    def add_to(self, step: StepMemory) -> StepMemory:
        """The device step's memory: the prefix weights are resident throughout; the prefix
        forward's transients come before the (top) training step, not on top of it."""
        weights = step.weights_bytes + self.weights_bytes
        return StepMemory(
            weights_bytes=weights,
            grads_bytes=step.grads_bytes,
            optimizer_bytes=step.optimizer_bytes,
            activations_bytes=step.activations_bytes,
            peak_bytes=max(step.peak_bytes + self.weights_bytes, weights + self.transient_bytes),
        )


class _Replay(torch.nn.Module):
    """Stands in for the embedding module: returns the cached states of the current batch."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        assert self.hidden is not None, "prefix cache: no hidden states set for this batch"
        return self.hidden


class PrefixCache:
    """Per-example outputs of the embeddings and blocks ``[0, k)``."""

    def __init__(self, model: torch.nn.Module, k: int) -> None:
        self.k = k
        self.model = model
        self.store: dict[tuple[int, int], torch.Tensor] = {}
        self.costs: dict[tuple[int, ...], PrefixCost] = {}
        self.embeddings = embeddings(model)
        self.blocks = list(transformer_layers(model))[:k]
        # Parameters and buffers (position ids ...), as measure_step counts weights.
        self.weights_bytes = sum(
            t.numel() * t.element_size()
            for m in (self.embeddings, *self.blocks)
            for t in (*m.parameters(), *m.buffers())
        )
        self.replay = _Replay()

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.embeddings, *self.blocks]

    def _prefix(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states at the input of block k, in eval mode: the real embeddings and the
        first k blocks, whatever is swapped in at the moment (``replaying``)."""
        was_training = self.model.training
        try:
            with swapped(self.model, self.embeddings, self.blocks):
                self.model.eval()  # after the swap: it reaches the prefix modules themselves
                return hidden_states_at(self.model, batch, self.k)
        finally:
            self.model.train(was_training)

    def batch(
        self, shard: ClientData, index: Sequence[int] | np.ndarray
    ) -> dict[str, torch.Tensor]:
        """The training batch; fills missing cache entries and arms the replay module."""
        index = [int(i) for i in index]
        batch = shard.batch(index)
        missing = [i for i in index if (shard.client_id, i) not in self.store]
        shape = tuple(batch["input_ids"].shape)
        if shape not in self.costs:
            with MemoryTracker() as tracker, FlopCounterMode(display=False) as counter:
                hidden = self._prefix(batch)
            self.costs[shape] = PrefixCost(
                counter.get_total_flops(), tracker.peak_bytes, self.weights_bytes
            )
            fresh = dict(zip(index, range(len(index)), strict=True))
        elif missing:
            sub = shard.batch(missing)
            hidden = self._prefix(sub)
            fresh = {i: j for j, i in enumerate(missing)}
        else:
            fresh = {}
        for i, row in fresh.items():
            if (shard.client_id, i) not in self.store:
                n = len(shard.seqs[i])
                self.store[(shard.client_id, i)] = hidden[row, :n].clone()
        padded = torch.zeros(*shape, self.store[(shard.client_id, index[0])].shape[-1])
        for row, i in enumerate(index):
            states = self.store[(shard.client_id, i)]
            padded[row, : len(states)] = states
        self.replay.hidden = padded
        return batch

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Swap in the replay module and the blocks from k on, for the duration."""
        try:
            with swapped(self.model, self.replay, list(transformer_layers(self.model))[self.k :]):
                yield
        finally:
            self.replay.hidden = None
