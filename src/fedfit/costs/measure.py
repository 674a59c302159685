"""What a client's work costs: peak memory by category, FLOPs, bytes on the wire.

This module holds the *measured* side: run the real step and record the truth.

Memory. torch's own ``MemTracker`` (torch.distributed._tools.mem_tracker) raises on any model
with frozen parameters in torch 2.13 (it hooks every parameter), so it cannot measure LoRA,
layer fine-tuning, forward gradients or zeroth-order steps. :class:`MemoryTracker` is a
``TorchDispatchMode`` that sees every aten op, adds the bytes of each storage first produced by
an op inside the mode, and subtracts them when the storage is freed (a weak reference callback
on the untyped storage). Tensors that existed before the mode (weights, existing optimiser
state) are never counted by the tracker; :func:`measure_step` adds them up directly.

FLOPs. ``torch.utils.flop_counter.FlopCounterMode``: it counts matrix products (mm, bmm,
addmm, convolution, attention), 2 FLOPs per multiply-add, and ignores element-wise work.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ClientCost",
    "MemoryTracker",
    "StepFn",
    "StepMemory",
    "backprop",
    "count_flops",
    "measure_step",
    "run_step",
    "storage_bytes",
]

# ``torch.tensor(data)`` builds its tensor outside the dispatcher and then hands it to the mode
# through ``lift_fresh``, whose output *is* its input: it is new memory nonetheless.
_FRESH_OPS = {torch.ops.aten.lift_fresh.default}


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or result (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    """The tensor's storage if it holds real memory, else None.

    None for meta/fake tensors, zero-size storages and tensors without a usable storage
    (the efficient zero tangents of forward AD, sparse and nested tensors).
    """
    if t.is_meta:
        return None
    try:
        st = t.untyped_storage()
        if st.device.type == "meta" or st.data_ptr() == 0 or st.nbytes() == 0:
            return None
    except (RuntimeError, NotImplementedError):
        return None
    return st


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``.

    Views and tied weights share a storage and are counted once; a tensor that is a slice of a
    larger storage counts the whole storage, since that is what stays in memory.
    """
    seen: dict[int, int] = {}
    for t in tensors:
        st = _storage(t)
        if st is not None:
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@dataclass
class _Entry:
    token: int  # unique per storage ever tracked (addresses are reused, tokens are not)
    nbytes: int
    ref: weakref.ref


class MemoryTracker(TorchDispatchMode):
    """Live bytes of storages allocated inside the mode and their peak.

    Every op's outputs are inspected; a storage is counted once (views share it, keyed by its
    data pointer) when it is neither already tracked nor the storage of one of the op's inputs
    (in-place ops, views and ``out=`` on pre-existing tensors allocate nothing). A weak
    reference callback on the storage subtracts it when it is freed, even after the mode exits.

    Works for anything eager: frozen parameters, ``no_grad``, ``torch.func.jvp`` (dual tensors
    without a data pointer are skipped), peft models. Not seen: scratch memory a kernel
    allocates and frees inside one aten op, memory allocated outside the dispatcher
    (``torch.from_numpy``), and growth of a *pre-existing* storage by ``resize_``.

    With ``record=True`` the tracker also keeps the sequence of (token, +/- bytes) events so a
    caller can later split the peak by category (see :func:`measure_step`).
    """

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, _Entry] = {}
        self._tokens = itertools.count()
        # Weak-reference callbacks run in whichever thread frees the storage (re-entrant: a
        # callback may fire while this thread holds the lock).
        self._lock = threading.RLock()
        self.events: list[tuple[int, int]] | None = [] if record else None

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        with self._lock:
            self.peak_bytes = self.live_bytes

    def token_of(self, t: torch.Tensor) -> int | None:
        """The token of the tracked storage behind ``t``, or None if the tracker never saw it."""
        st = _storage(t)
        entry = None if st is None else self._live.get(st.data_ptr())
        return None if entry is None else entry.token

    def _change(self, token: int, delta: int) -> None:
        with self._lock:
            self.live_bytes += delta
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            if self.events is not None:
                self.events.append((token, delta))

    def _freed(self, ptr: int, token: int, _ref: weakref.ref) -> None:
        with self._lock:
            entry = self._live.get(ptr)
            if entry is not None and entry.token == token:
                del self._live[ptr]
                self._change(token, -entry.nbytes)

    def _track(self, st: torch.UntypedStorage) -> None:
        with self._lock:
            self._track_locked(st)

    def _track_locked(self, st: torch.UntypedStorage) -> None:
        ptr = st.data_ptr()
        entry = self._live.get(ptr)
        if entry is not None:
            if entry.nbytes != st.nbytes():  # grown or shrunk in place (resize_, out=)
                delta, entry.nbytes = st.nbytes() - entry.nbytes, st.nbytes()
                self._change(entry.token, delta)
            return
        token = next(self._tokens)
        ref = weakref.ref(st, partial(self._freed, ptr, token))
        self._live[ptr] = _Entry(token, st.nbytes(), ref)
        self._change(token, st.nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs: set[int] | None = None  # data pointers of the inputs, computed only if needed
        for t in _tensors(out):
            st = _storage(t)
            if st is None:
                continue
            ptr = st.data_ptr()
            if ptr not in self._live and func not in _FRESH_OPS:
                if inputs is None:
                    inputs = {
                        s.data_ptr()
                        for s in map(_storage, _tensors((args, kwargs)))
                        if s is not None
                    }
                if ptr in inputs:  # aliases memory that existed before this op
                    continue
            self._track(st)
        return out


@dataclass(frozen=True)
class StepMemory:
    """Memory of one training step, in bytes, by category.

    - ``weights_bytes``: all parameters and buffers (trainable and frozen, tied ones once).
    - ``grads_bytes``: the ``.grad`` tensors present after backward.
    - ``optimizer_bytes``: the optimiser's state tensors after ``step()`` (Adam: two moments
      per trainable tensor plus a 4-byte step counter each).
    - ``activations_bytes``: the most memory live at any moment of forward + backward that is
      not a grad: saved activations and temporaries (including the loss and the grads of
      non-leaf tensors), measured from the start of the step.
    - ``peak_bytes``: the measured peak: weights + grads and state that existed before the step
      + the most bytes the step held at once.

    How they relate. The step has two phases, and the peak is the larger of the two:
    forward + backward holds at most ``weights + grads + optimizer + activations`` (state that
    already exists sits idle in memory), and ``optimizer.step()`` holds
    ``weights + grads + optimizer`` plus the optimiser's own temporaries (single-tensor Adam:
    about two copies of the largest trainable tensor). So ``peak_bytes`` equals the sum of the
    four categories up to those temporaries; with tiny batches on full fine-tuning the step
    phase can win, and ``peak_bytes`` then exceeds the sum by the temporaries.
    """

    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    peak_bytes: int

    def as_dict(self) -> dict[str, int]:
        """The five numbers by field name (for JSON lines)."""
        return asdict(self)


def _optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in _tensors(state)]


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _transient_peak(events: list[tuple[int, int]], excluded: set[int]) -> int:
    """Most bytes live at once counting only tokens not in ``excluded`` (replays the events)."""
    live = peak = 0
    for token, delta in events:
        if token not in excluded:
            live += delta
            peak = max(peak, live)
    return peak


StepFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""How a step gets its gradients: called with (model, batch), it returns the loss and leaves
each trainable parameter's gradient (or gradient estimate) in ``.grad``."""


def backprop(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The default :data:`StepFn`: forward, then ``backward()`` through the stored graph."""
    loss = model(**batch).loss
    loss.backward()
    return loss


def run_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    step: StepFn = backprop,
) -> float:
    """One unmeasured step: gradients by ``step``, optimiser step, grads released."""
    loss = step(model, batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    step: StepFn = backprop,
) -> tuple[float, StepMemory, int]:
    """Run ONE real training step and measure it; returns (loss, memory, FLOPs).

    The step is ``step(model, batch)`` (by default ``model(**batch).loss`` -> ``backward()``;
    forward-gradient and finite-difference methods pass their own) -> ``optimizer.step()`` ->
    ``optimizer.zero_grad(set_to_none=True)``, run under :class:`MemoryTracker` and
    ``FlopCounterMode``: it is the step the caller would have run anyway, not a rehearsal.

    Optimiser state is created lazily on the first ``step()``; then it is allocated inside the
    tracker and counted there. From the second step on it already exists and is counted from
    ``optimizer.state`` (as are gradients left over from an earlier backward). Which tracked
    storages became grads is only known after backward, so the tracker records its allocation
    events and :attr:`StepMemory.activations_bytes` is found by replaying the forward and
    backward events without those storages.

    Not counted: the batch tensors themselves (they exist before the step; token ids are
    small). Measure in the mode the step really runs in: ``model.train()`` adds dropout masks
    (MiniLM-L6 + LoRA, 8 x 64: activations 62 MB in eval mode, 90 MB in train mode).
    FlopCounterMode's module hooks are part of the measured step; they changed the peak by
    nothing on MiniLM and by 1% on a 2-layer, hidden-32 BERT at 16 x 128.
    """
    weights = storage_bytes(itertools.chain(model.parameters(), model.buffers()))
    pre_grads = storage_bytes(_grads(model))
    pre_state = storage_bytes(_optimizer_state_tensors(optimizer))
    tracker = MemoryTracker(record=True)
    with tracker, FlopCounterMode(display=False) as flop_counter:
        loss = step(model, batch)
        grads = _grads(model)
        grads_bytes = storage_bytes(grads)
        grad_tokens = {token for token in map(tracker.token_of, grads) if token is not None}
        del grads
        assert tracker.events is not None
        forward_backward = list(tracker.events)
        optimizer.step()
        state_bytes = storage_bytes(_optimizer_state_tensors(optimizer))
        optimizer.zero_grad(set_to_none=True)
    memory = StepMemory(
        weights_bytes=weights,
        grads_bytes=grads_bytes,
        optimizer_bytes=state_bytes,
        activations_bytes=_transient_peak(forward_backward, grad_tokens),
        peak_bytes=weights + pre_grads + pre_state + tracker.peak_bytes,
    )
    return loss.item(), memory, flop_counter.get_total_flops()


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Call ``fn(*args, **kwargs)`` under ``FlopCounterMode``; return (its result, total FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


@dataclass(frozen=True)
class ClientCost:
    """What one client's round cost (one line of ``clients.jsonl``).

    ``flops`` sums every step of the round; ``peak_memory_bytes`` and ``memory`` (a
    :meth:`StepMemory.as_dict`) come from the step with the largest peak.
    """

    flops: int
    peak_memory_bytes: int
    memory: dict[str, int]
    upload_bytes: int
    download_bytes: int

    @classmethod
    def from_steps(
        cls,
        steps: Iterable[tuple[StepMemory, int]],
        upload_bytes: int,
        download_bytes: int,
    ) -> ClientCost:
        """Combine the (memory, FLOPs) of each step of a round with the bytes moved."""
        steps = list(steps)
        if not steps:
            raise ValueError("ClientCost.from_steps needs at least one measured step")
        largest = max((memory for memory, _ in steps), key=lambda m: m.peak_bytes)
        return cls(
            flops=sum(flops for _, flops in steps),
            peak_memory_bytes=largest.peak_bytes,
            memory=largest.as_dict(),
            upload_bytes=upload_bytes,
            download_bytes=download_bytes,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)
