"""Seeded in-place perturbation: the shared core of the zero-order (ZO) methods.

MeZO (Malladi et al., NeurIPS 2023), docs/methods.md: with a seed s, a direction z ~ N(0, I)
of the trained tensors' shape, two forward passes give the projected gradient

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)       (an estimate of z . grad L)

and the step is ``theta <- theta - lr g z``. z is never stored: every pass regenerates it from
the seed, piece by piece, so a ZO step needs the weights, one forward pass's activations and a
few pieces of z, i.e. inference-level memory.

What z is. For a tensor named ``name`` and a step seed ``s``, z is drawn by a torch CPU
generator seeded with :func:`derive` ``(s, crc32(name))``, ``CHUNK`` elements per call over the
flattened tensor, in float32 (then cast to the tensor's dtype). It depends on the seed and the
tensor's name only: not on which other tensors are perturbed, nor on their order, so a server
can replay a client's (seed, scalar) pairs on its own copy of the same tensors. ``CHUNK`` is
part of that definition (client and server must agree on it).

Bit-identical restore. ``p + eps z - eps z`` is not ``p`` in float arithmetic: when adding
``d = eps z`` moves ``p`` into a higher binade, the low bits of ``p`` are rounded away (about
4% of MiniLM's weights at eps = 1e-3, 7% of a random BERT's), and no choice of perturbed
value can avoid it (many nearby ``p`` map to the same ``p + d``). The information lost must
be kept somewhere. Keeping a copy of the tensors costs their full size (2x the weights for full
fine-tuning: not inference-level), so :func:`perturb_` keeps only what is lost: piece by piece
it computes ``q = p + d`` and the would-be restore ``r = q - d`` with the very arithmetic
:func:`restore_` uses (two correctly rounded IEEE operations, no fused multiply-add, hence the
same bits every time), and records the elements where ``r`` differs from ``p`` in its bit
pattern: their offset in the piece (int16) and the integer difference of the bit patterns
(int8; the rare larger ones keep the whole original bit pattern). That is 3 bytes per affected
element, about 3-6% of the trained tensors' bytes at eps = 1e-3, freed when the tensors are
restored. Restore recomputes ``q - d`` in place and applies the recorded corrections: the
tensors come back bit for bit (-0.0 and NaN included, since bit patterns are compared).

Every function here runs under ``torch.no_grad`` on the tensors' storage.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

CHUNK = 1 << 14
"""Elements of z drawn per generator call; part of z's definition (and the size of the pieces
processed at once, so that the temporaries stay a few hundred kilobytes)."""

_BITS = {4: torch.int32, 2: torch.int16, 8: torch.int64}


def derive(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (independent streams per tuple)."""
    words = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & 0x7FFFFFFFFFFFFFFF


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of z for tensor ``name`` at step seed ``seed``."""
    return derive(seed, zlib.crc32(name.encode()))


def _flat(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("zero-order perturbation needs contiguous tensors")
    return t.detach().view(-1)


def _pieces(name: str, t: torch.Tensor, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(piece of the flattened tensor, its piece of z), ``CHUNK`` elements at a time."""
    flat = _flat(t)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    for start in range(0, flat.numel(), CHUNK):
        piece = flat[start : start + CHUNK]
        z = torch.randn(piece.numel(), generator=generator)
        yield piece, z.to(device=t.device, dtype=t.dtype)


# A piece's corrections: offsets (int16) and bit differences (int8) of the elements that
# q - d does not bring back, then offsets and original bit patterns of those whose difference
# does not fit int8. None: the piece comes back exactly without help.
_Fix = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None


@dataclass
class Perturbation:
    """What :func:`restore_` needs to undo ``p <- p + scale * z(seed)`` bit for bit."""

    seed: int
    scale: float
    fixes: dict[str, list[_Fix]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the corrections."""
        return sum(
            t.numel() * t.element_size() for f in self.fixes.values() for x in f if x for t in x
        )


def _apply(piece: torch.Tensor, d: torch.Tensor) -> _Fix:
    """``piece <- piece + d`` in place; returns the corrections that undo it exactly."""
    bits = _BITS[piece.element_size()]
    q = piece + d
    back = torch.sub(q, d, out=d)  # the restore's arithmetic, into d's memory (d is done)
    delta = torch.sub(piece.view(bits), back.view(bits), out=back.view(bits))
    where = delta.nonzero().squeeze(1)
    fix: _Fix = None
    if where.numel():
        diff = delta[where]
        small = (diff >= -128) & (diff <= 127)
        big = where[~small]
        fix = (
            where[small].to(torch.int16),
            diff[small].to(torch.int8),
            big.to(torch.int16),
            piece.view(bits)[big],  # advanced indexing copies: the original bit patterns
        )
    piece.copy_(q)
    return fix


def _undo(piece: torch.Tensor, d: torch.Tensor, fix: _Fix) -> None:
    """``piece <- piece - d`` in place, then the recorded corrections: the original bits."""
    piece.sub_(d)
    if fix is None:
        return
    bits = piece.view(_BITS[piece.element_size()])
    small_at, small_diff, big_at, big_bits = fix
    if small_at.numel():
        at = small_at.long()
        bits[at] += small_diff.to(bits.dtype)
    if big_at.numel():
        bits[big_at.long()] = big_bits


@torch.no_grad()
def perturb_(params: Mapping[str, torch.Tensor], seed: int, scale: float) -> Perturbation:
    """``p <- p + scale * z(seed)`` in place for every tensor; returns what undoes it exactly."""
    record = Perturbation(seed, scale)
    for name, t in params.items():
        record.fixes[name] = [_apply(piece, z.mul_(scale)) for piece, z in _pieces(name, t, seed)]
    return record


@torch.no_grad()
def restore_(
    params: Mapping[str, torch.Tensor], record: Perturbation, then_scale: float | None = None
) -> Perturbation | None:
    """Undo ``record`` bit for bit. With ``then_scale``, perturb again along the same z by
    ``then_scale`` in the same pass (z is generated once for both) and return that record."""
    again = None if then_scale is None else Perturbation(record.seed, then_scale)
    for name, t in params.items():
        fixes = record.fixes[name]
        redone: list[_Fix] = []
        for k, (piece, z) in enumerate(_pieces(name, t, record.seed)):
            _undo(piece, torch.mul(z, record.scale), fixes[k])
            fixes[k] = None  # free the corrections as we go
            if then_scale is not None:
                redone.append(_apply(piece, z.mul_(then_scale)))
        if again is not None:
            again.fixes[name] = redone
    return again


@torch.no_grad()
def add_noise_(params: Mapping[str, torch.Tensor], seed: int, coeff: float) -> None:
    """``p <- p + coeff * z(seed)``: the ZO update step (and its replay, bit for bit)."""
    for name, t in params.items():
        for piece, z in _pieces(name, t, seed):
            piece.add_(z.mul_(coeff))


def replay_(
    params: Mapping[str, torch.Tensor], seeds: Sequence[int], coeffs: Sequence[float]
) -> None:
    """Apply ``p <- p + c z(s)`` for each (s, c) in order: rebuilds a model from its pairs."""
    for s, c in zip(seeds, coeffs, strict=True):
        add_noise_(params, int(s), float(c))


def replay_flops(params: Mapping[str, torch.Tensor], pairs: int) -> int:
    """FLOPs a device spends replaying ``pairs`` (seed, scalar) pairs on ``params``: one
    multiply-add (2 FLOPs) per element per pair. Drawing z is not counted, as no element-wise
    work is (FlopCounterMode counts matrix products only, and the perturbation passes of a ZO
    step are not counted either); it costs about as much again on a CPU."""
    return 2 * pairs * sum(t.numel() for t in params.values())


def as_float32(x: float) -> float:
    """``x`` rounded to float32: the scalar as it crosses the network (and as it is applied,
    so that the sender's steps and a replay of the sent scalars agree bit for bit)."""
    return float(np.float32(x))


def projected_gradient(
    params: Mapping[str, torch.Tensor],
    seed: int,
    eps: float,
    loss_fn: Callable[[], float],
) -> tuple[float, float, float]:
    """MeZO's two-point estimate along z(seed); returns (g, L+, L-) with g rounded to float32.

    ``loss_fn`` evaluates the loss at the tensors' current values. The tensors go to
    theta + eps z, then straight to theta - eps z (one pass over z), then back to theta bit
    for bit, also if ``loss_fn`` raises.
    """
    record: Perturbation | None = perturb_(params, seed, eps)
    try:
        plus = loss_fn()
        assert record is not None
        record = restore_(params, record, then_scale=-eps)
        minus = loss_fn()
    finally:
        if record is not None:
            restore_(params, record)
    return as_float32((plus - minus) / (2 * eps)), plus, minus
