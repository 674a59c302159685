"""Spry's split of the trainable tensors among a round's clients (pure: names in, names out).

Spry (algorithms/forward/spry.py) trains with it and the cost model (costs/predict.py,
``TrainSpec.share``) predicts with it, so it sits below both.
"""

from __future__ import annotations

from collections.abc import Sequence


def tensor_groups(names: Sequence[str], head: Sequence[str]) -> list[list[str]]:
    """Spry's units of assignment, in model order: a LoRA module's A and B together, every
    other tensor alone; the head tensors (``head``) are left out (shared or grouped by the
    caller)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        if n in head:
            continue
        key = n.replace("lora_A", "lora_*").replace("lora_B", "lora_*")
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def assign_groups(num_groups: int, num_clients: int) -> list[list[int]]:
    """Group indices per client position. K <= G: group g goes to client g mod K (each group
    trained by exactly one client). K > G: client i trains group i mod G, so each group is
    trained by floor(K/G) or ceil(K/G) clients and averaged over them."""
    if num_groups < 1 or num_clients < 1:
        raise ValueError(f"need >= 1 group and client, got {num_groups} and {num_clients}")
    if num_clients <= num_groups:
        return [list(range(i, num_groups, num_clients)) for i in range(num_clients)]
    return [[i % num_groups] for i in range(num_clients)]
