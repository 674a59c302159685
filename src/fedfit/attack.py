"""Simulated malicious and faulty clients: the ``[attack]`` config section (simulation only).

A share of the population (``attack.fraction``, or the ids in ``attack.clients``) corrupts
every update it sends, after its honest local training and before the upload crosses the
channel, so the server sees exactly what such a device would send. The attackers are drawn
once per run from the run seed (the same ids in every process: local, Ray actors, Flower
nodes), and every client row says whether its client attacked (``"attack"`` in
clients.jsonl).

Kinds (``attack.kind``), with ``change`` = the client's upload minus the tensors it was sent
(weights) or the upload itself (gradients, and the projected gradients of seed-and-scalar
methods):

- ``sign_flip``: the change reversed and multiplied by ``attack.scale`` (1 = a plain flip);
- ``scale``: the change multiplied by ``attack.scale`` (a boosted update);
- ``gaussian``: the change replaced by Gaussian noise of standard deviation ``attack.scale``
  (seeded by run seed, round and client);
- faults that the server's validation must catch (engine/validation.py): ``nan`` (one value
  of the first floating tensor set to NaN), ``shape`` (the first tensor doubled along a new
  leading dimension), ``count`` (the example count claimed 1000 times larger), and ``error``
  (the client raises instead of uploading, like a device that crashes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedfit.engine.seeds import derive_seed
from fedfit.errors import check, check_choice
from fedfit.payload import leading_region

if TYPE_CHECKING:  # the config loads this module; algorithms/base.py loads the config
    from fedfit.algorithms.base import ClientTask, Update

ATTACKS = ("none", "sign_flip", "scale", "gaussian", "nan", "shape", "count", "error")
# salt of the attackers' draw, so that it is not correlated with the run seed's other draws
_SALT = 0xA77AC4


@dataclass(frozen=True)
class AttackConfig:
    """The ``[attack]`` config section."""

    kind: str = field(
        default="none",
        metadata={"help": "none | sign_flip | scale | gaussian | nan | shape | count | error"},
    )
    fraction: float = field(
        default=0.0, metadata={"help": "share of the population that attacks (seeded draw)"}
    )
    clients: tuple[int, ...] = field(
        default=(), metadata={"help": "attacking client ids (instead of fraction)"}
    )
    scale: float = field(
        default=1.0,
        metadata={"help": "sign_flip / scale: factor on the change; gaussian: noise std"},
    )

    def __post_init__(self) -> None:
        check_choice(self.kind, "attack.kind", ATTACKS)
        check(0 <= self.fraction <= 1, "attack.fraction", "must be in [0, 1]")
        check(all(c >= 0 for c in self.clients), "attack.clients", "ids must be >= 0")
        check(
            not (self.clients and self.fraction),
            "attack.clients",
            "give either attack.clients or attack.fraction, not both",
        )
        check(self.scale >= 0, "attack.scale", "must be >= 0")


def attackers(config: AttackConfig, num_clients: int, seed: int) -> frozenset[int]:
    """The attacking client ids: ``attack.clients``, or round(fraction x num_clients) ids
    drawn without replacement from the run seed."""
    if config.kind == "none":
        return frozenset()
    if config.clients:
        check(
            max(config.clients) < num_clients,
            "attack.clients",
            f"ids must be < data.num_clients = {num_clients}",
        )
        return frozenset(config.clients)
    count = int(round(config.fraction * num_clients))
    rng = np.random.default_rng([seed, _SALT])
    return frozenset(int(i) for i in rng.choice(num_clients, count, replace=False))


@dataclass(frozen=True)
class Attack:
    """The run's attack: its kind and factor, and which clients carry it out."""

    kind: str
    scale: float
    clients: frozenset[int]
    seed: int

    def __contains__(self, client_id: int) -> bool:
        return client_id in self.clients

    def corrupt(self, update: Update, task: ClientTask, payload_kind: str) -> Update:
        """What attacking client ``update.client_id`` sends instead of ``update``."""
        if self.kind == "error":
            raise RuntimeError(f"client {update.client_id} crashed (attack.kind = 'error')")
        if self.kind == "count":
            return replace(update, num_examples=update.num_examples * 1000)
        payload = dict(update.payload)
        if self.kind in ("nan", "shape"):
            name = next(n for n, t in payload.items() if t.is_floating_point())
            t = payload[name].clone()
            if self.kind == "nan":
                t.view(-1)[0] = float("nan")
                payload[name] = t
            else:
                payload[name] = torch.stack([t, t])
            return replace(update, payload=payload)
        weights = payload_kind in ("weights", "subset", "slices")
        gen = torch.Generator().manual_seed(
            derive_seed(self.seed, task.round, task.client_id, _SALT)
        )
        for name, t in payload.items():
            if not t.is_floating_point():
                continue  # seeds and indices stay: the attack is on the values
            sent = task.download.get(name) if weights else None
            if sent is not None and payload_kind == "slices":  # SLT: the sent tensor's slice
                sent = sent[leading_region(t.shape)]
            base = sent.to(t.dtype) if sent is not None else torch.zeros_like(t)
            change = t - base
            if self.kind == "sign_flip":
                change = -self.scale * change
            elif self.kind == "scale":
                change = self.scale * change
            else:  # gaussian
                change = self.scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            payload[name] = base + change
        return replace(update, payload=payload)


def make_attack(config: AttackConfig, num_clients: int, seed: int) -> Attack | None:
    """The run's attack, or None when ``attack.kind = "none"`` or no client attacks."""
    clients = attackers(config, num_clients, seed)
    if not clients:
        return None
    return Attack(config.kind, config.scale, clients, seed)
