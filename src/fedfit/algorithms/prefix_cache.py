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
device step.

Exactness. An example's states depend on the width its batch is padded to only through
the attention softmax over the padded keys: torch's CPU softmax reduces a row shorter
than its vector width (16 floats with AVX-512, 8 with AVX2) in a scalar loop and a longer
row in vector lanes, where masked (padded) keys add exact zeros, so every width >=
``MIN_WIDTH`` gives the same floats and a narrower one may differ in the last bit (measured
on minilm-l6 at block 4: up to 6e-6; the matmuls' rows do not depend on the batch). So entries are computed and served only at widths >= ``MIN_WIDTH``;
a narrower batch runs its prefix as the uncached step does. With float32 entries the cached
run then equals the uncached one bit for bit on this CPU (tests/algorithms/
test_prefix_cache.py); on other kernels (GPU, other vector widths) it equals it up to float
summation order. The replayed states of padding positions are zeros, not the pad token's
states: nothing real attends to them and their gradient is zero, so nothing changes.

Memory. ``max_bytes`` caps the bytes the stored tensors hold: the least recently visited
clients' entries are dropped to make room (and recomputed on their next visit, which
changes nothing but time); an entry that still does not fit is used once and not kept.
``dtype = torch.float16`` halves the bytes; the replayed states are then rounded to half
precision, which does change results slightly (benchmarks/results/prefix_cache.md).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedfit.algorithms.base import ClientData
from fedfit.costs import MemoryTracker, StepMemory
from fedfit.models.structure import embeddings, hidden_states_at, swapped, transformer_layers

# Narrowest batch whose prefix states are cached or served (see "Exactness" above).
MIN_WIDTH = 16


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


def nbytes(t: torch.Tensor) -> int:
    """Bytes of the storage behind ``t``: what keeping it costs."""
    return t.untyped_storage().nbytes()


class PrefixCache:
    """Per-example outputs of the embeddings and blocks ``[0, k)``, per client, least
    recently visited client evicted first once ``max_bytes`` (0 = no cap) would be passed.

    ``served`` / ``computed`` count example-visits whose states came from the store / from
    a prefix forward (a batch of a new shape is measured on a full forward, so all of it
    counts as computed); ``peak_bytes`` is the most the store held."""

    def __init__(
        self, model: torch.nn.Module, k: int, max_bytes: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:
        self.k, self.model, self.max_bytes, self.dtype = k, model, max_bytes, dtype
        self.store: OrderedDict[int, dict[int, torch.Tensor]] = OrderedDict()
        self.costs: dict[tuple[int, ...], PrefixCost] = {}
        self.held_bytes = self.peak_bytes = self.served = self.computed = self.evicted = 0
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

    def stored_bytes(self) -> int:
        """Bytes held now, summed over the stored tensors' storages."""
        return sum(nbytes(t) for entries in self.store.values() for t in entries.values())

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

    def _keep(self, client: int, i: int, states: torch.Tensor) -> None:
        """Store one entry, evicting least recently visited clients (not ``client``) to
        stay within ``max_bytes``; an entry that cannot fit is not kept."""
        if i in self.store[client]:  # recomputed for a new batch shape: the same floats
            return
        states = states.to(self.dtype, copy=True)  # its own storage, not a view of the batch
        size = nbytes(states)
        if self.max_bytes:
            while self.held_bytes + size > self.max_bytes and next(iter(self.store)) != client:
                _, dropped = self.store.popitem(last=False)
                self.held_bytes -= sum(nbytes(t) for t in dropped.values())
                self.evicted += 1
            if self.held_bytes + size > self.max_bytes:
                return
        self.store[client][i] = states
        self.held_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def batch(
        self, shard: ClientData, index: Sequence[int] | np.ndarray
    ) -> dict[str, torch.Tensor]:
        """The training batch; fills missing cache entries and arms the replay module."""
        index = [int(i) for i in index]
        batch = shard.batch(index)
        shape = tuple(batch["input_ids"].shape)
        entries = self.store.setdefault(shard.client_id, {})
        self.store.move_to_end(shard.client_id)  # most recently visited
        hidden: torch.Tensor | None
        if shape not in self.costs:  # measured on the whole batch, which it then serves
            with MemoryTracker() as tracker, FlopCounterMode(display=False) as counter:
                hidden = self._prefix(batch)
            self.costs[shape] = PrefixCost(
                counter.get_total_flops(), tracker.peak_bytes, self.weights_bytes
            )
            fresh = list(range(len(index)))
        elif shape[1] < MIN_WIDTH:
            hidden, fresh = self._prefix(batch), list(range(len(index)))
        else:
            fresh = [row for row, i in enumerate(index) if i not in entries]
            # the missing rows at this batch's width, as the uncached step computes them
            hidden = self._prefix({name: v[fresh] for name, v in batch.items()}) if fresh else None
        self.computed += len(fresh)
        self.served += len(index) - len(fresh)
        if hidden is not None and shape[1] >= MIN_WIDTH:
            for j, row in enumerate(fresh):
                self._keep(shard.client_id, index[row], hidden[j, : len(shard.seqs[index[row]])])
        if hidden is not None and len(fresh) == len(index):
            padded = hidden
        else:
            hidden_size = next(iter(entries.values())).shape[-1]
            padded = torch.zeros(*shape, hidden_size)  # padding positions: zeros (see "Exactness")
            if hidden is not None:
                padded[fresh] = hidden
            served = set(range(len(index))) - set(fresh)
            for row in served:
                states = entries[index[row]]
                padded[row, : len(states)] = states
        if self.dtype != torch.float32:  # replay what is stored, also when computed just now
            padded = padded.to(self.dtype).float()
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
