"""Shared test helpers: tiny shards, dropout off."""

from __future__ import annotations

import numpy as np
import torch

from fedfit.algorithms.base import ClientData


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every dropout so train-mode outputs are deterministic functions of the weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def random_shard(
    client_id: int,
    n: int,
    seed: int,
    num_labels: int = 3,
    lm: bool = False,
    vocab: tuple[int, int] = (1000, 1200),
    length: int | None = None,
) -> ClientData:
    """``n`` random token sequences of 5..12 tokens (or exactly ``length``; real vocab ids),
    with labels."""
    rng = np.random.default_rng(seed)
    sizes = [length or int(rng.integers(5, 13)) for _ in range(n)]
    seqs = [rng.integers(*vocab, size=size).astype(np.int32) for size in sizes]
    labels = None if lm else rng.integers(0, num_labels, size=n)
    return ClientData(client_id, seqs, labels, pad_id=0, lm=lm)
