"""Checks on every update before the server aggregates it.

A federated server cannot trust what arrives: a device with a bug, a flipped bit or an
attacker can send NaN, a tensor of the wrong shape (which broadcasting would silently spread
over a whole matrix), or an example count that lets it dominate the weighted mean.
``client_failure`` says whether the client's round itself failed (an error in its row, a
non-finite training loss); ``rejection`` returns why an update must not be aggregated (or
None when it may), from what the server knows without trusting the client:

- every floating-point value is finite;
- for uploads of tensors (``payload_kind`` "weights", "gradient", "subset"): every name is
  one the client was sent in its download, with that tensor's shape and dtype (a method
  whose clients train a smaller part, HetLoRA's ranks, is sent that part); "slices" (SLT's
  narrowed blocks): each tensor's shape is a leading slice of the one sent (as many
  dimensions, none longer);
- for seed-and-scalar uploads ("scalars"): integer tensors (seeds, indices) are
  non-negative;
- the example count is a positive integer no larger than the client's shard (in simulation
  and in a deployment the server knows each client's shard: it builds the same partition);
- the upload's size is within the device's upload budget, when it has one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedfit.algorithms.base import ClientTask, Update
from fedfit.devices import Budget
from fedfit.payload import is_leading_slice

TENSOR_KINDS = ("weights", "gradient", "subset", "slices")


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many of a tensor's values are NaN or infinite (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())


def non_finite(params: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (the global model after a step)."""
    return [name for name, t in params.items() if non_finite_count(t)]


def tensor_problem(
    name: str, tensor: object, sent: Mapping[str, torch.Tensor] | None, slices: bool = False
) -> str | None:
    """What is wrong with one payload tensor, or None (``sent``: the download it must match,
    None for seed-and-scalar payloads; ``slices``: a leading slice of it is enough)."""
    if not isinstance(tensor, torch.Tensor):
        return f"{name}: not a tensor ({type(tensor).__name__})"
    bad = non_finite_count(tensor)
    if bad:
        return f"{name}: {bad} of {tensor.numel()} values are not finite"
    if sent is None:
        if (
            not tensor.is_floating_point()
            and tensor.dtype != torch.bool
            and bool((tensor < 0).any())
        ):
            return f"{name}: negative seeds or indices"
        return None
    if name not in sent:
        return f"{name}: not a tensor the client was sent"
    ref = sent[name]
    if slices:
        if not is_leading_slice(tensor.shape, ref.shape):
            return (
                f"{name}: shape {tuple(tensor.shape)} is not a slice of the tensor sent, "
                f"{tuple(ref.shape)}"
            )
    elif tuple(tensor.shape) != tuple(ref.shape):
        return f"{name}: shape {tuple(tensor.shape)}, the tensor sent is {tuple(ref.shape)}"
    if tensor.dtype != ref.dtype:
        return f"{name}: dtype {tensor.dtype}, the tensor sent is {ref.dtype}"
    return None


def client_failure(row: Mapping[str, Any], metrics: Mapping[str, Any]) -> str | None:
    """Why a client's round failed, or None: the error its measured ``row`` carries, or a
    training loss in its ``metrics`` that is NaN or infinite (its training diverged)."""
    if "error" in row:
        return f"the client failed: {row['error']}"
    loss = metrics.get("train_loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        return f"its training loss is {loss} (the client's training diverged)"
    return None


def rejection(
    update: Update,
    task: ClientTask,
    kind: str,
    *,
    shard_size: int,
    upload_bytes: int,
    budget: Budget,
) -> str | None:
    """Why ``update`` (the reply to ``task``) must not be aggregated, or None."""
    if update.client_id != task.client_id:
        return f"the update names client {update.client_id}, the task was client {task.client_id}"
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"num_examples {n!r}: must be a positive integer"
    if n > shard_size:
        return f"num_examples {n}: the client holds {shard_size} examples"
    if not budget.unlimited and budget.upload_bytes and upload_bytes > budget.upload_bytes:
        return f"upload of {upload_bytes} bytes over the device's budget of {budget.upload_bytes}"
    sent = task.download if kind in TENSOR_KINDS else None
    for name, tensor in update.payload.items():
        problem = tensor_problem(name, tensor, sent, slices=kind == "slices")
        if problem is not None:
            return problem
    return None
