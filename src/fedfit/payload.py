"""Payloads on the wire: (de)serialisation, and the byte counts reported as upload/download.

A payload is a flat ``{name: tensor}`` dict: model tensors for backprop methods, only the
trained tensors for PEFT or layer methods, small tensors of seeds and scalars for seed-based
zero-order methods. It is serialised with safetensors (an 8-byte header length, a JSON header
naming dtype/shape/offsets, then the raw little-endian data), so the reported byte count is
the real size of what would cross the network, header included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load as _load
from safetensors.torch import save as _save

Payload = dict[str, torch.Tensor]


def serialize(payload: Mapping[str, torch.Tensor]) -> bytes:
    """The bytes of ``payload`` on the wire (tensors made contiguous, moved to CPU)."""
    return _save({k: v.detach().to("cpu").contiguous() for k, v in payload.items()})


def deserialize(data: bytes) -> Payload:
    """Inverse of ``serialize``."""
    return dict(_load(data))


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Size in bytes of the serialised payload."""
    return len(serialize(payload))


def is_leading_slice(shape: Sequence[int], full: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` can be the leading slice ``[:a, :b, ...]`` of one of
    ``full`` (as many dimensions, none longer): SLT's uploads of narrowed blocks."""
    return len(shape) == len(full) and all(a <= b for a, b in zip(shape, full, strict=True))


def leading_region(shape: Sequence[int]) -> tuple[slice, ...]:
    """The index of the leading slice of a larger tensor that a tensor of ``shape`` holds."""
    return tuple(slice(0, n) for n in shape)
