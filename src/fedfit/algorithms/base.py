"""The Algorithm base class, the objects that cross it, and the shared pure functions.

An algorithm is four hooks (docs/architecture.md), plus ``start_round`` (told the round's sampled
clients in order before any ``configure``: Spry splits the tensors among them) and ``plan`` (what a device with a given budget
would train, and its predicted cost, or why it cannot take part): ``init`` builds the server state, ``configure`` says
what one client gets this round, ``client_update`` trains on one client's shard and returns
the payload that would cross the network, ``aggregate`` folds the round's updates into the
new server state. ``prepare`` runs once per run to mark what is trainable (or wrap the model
with PEFT). Algorithms never touch engine internals: the engine hands them the one shared
model and a ``ClientContext``; everything random in a client step derives from
``ClientTask.seed``, itself derived from (run seed, round, client id).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from fedfit.config import Config, ServerConfig, TrainConfig
from fedfit.costs.measure import StepFn
from fedfit.costs.spec import TrainSpec
from fedfit.data import collate
from fedfit.payload import Payload
from fedfit.planning import CostContext, Plan, check
from fedfit.privacy import dp_mean, noise_seed
from fedfit.robust import combine
from fedfit.robust import weighted_mean as weighted_mean

if TYPE_CHECKING:
    from fedfit.devices import Budget


@dataclass
class ClientData:
    """One client's shard: unpadded token ids (and labels for classification)."""

    client_id: int
    seqs: list[np.ndarray]
    labels: np.ndarray | None
    pad_id: int
    lm: bool

    def __len__(self) -> int:
        return len(self.seqs)

    def batch(self, index: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Collate examples ``index``, padded to the longest of them (no wasted padding)."""
        labels = None if self.labels is None else [int(self.labels[i]) for i in index]
        return collate([self.seqs[i] for i in index], self.pad_id, labels=labels, lm=self.lm)


@dataclass
class ServerState:
    """Global state: trainable tensors, server-optimiser state, method extras."""

    round: int
    params: dict[str, torch.Tensor]
    opt_state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientTask:
    """What the server sends one client: its download payload, a seed for its randomness,
    and method-specific instructions (e.g. how many layers to train)."""

    client_id: int
    round: int
    seed: int
    download: Payload
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Update:
    """What one client sends back. ``payload`` is exactly what crosses the network."""

    client_id: int
    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class StepMeter(Protocol):
    """Runs a client's training steps and records their measured cost (engine/meter.py)."""

    def train_step(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: dict[str, torch.Tensor],
        skipped: Any = None,
        step: StepFn = ...,
        kind: Hashable = ...,
    ) -> float: ...

    def add_flops(self, flops: int) -> None: ...


@dataclass
class ClientContext:
    train: TrainConfig
    meter: StepMeter


class Algorithm:
    """The base of every method: the hooks (module docstring), each with FedAvg's behaviour
    (McMahan et al., AISTATS 2017): every parameter trained by local steps, the new trainable
    tensors uploaded, their example-weighted mean taken through the server optimiser.

    A method overrides the hooks it changes and nothing else; ``make_algorithm`` builds it
    as ``cls(options, config)``. Two declarations the engine reads besides the hooks:

    - ``payload_kind``, what an upload holds, for the wire (engine/channel.py): "weights"
      (the new values of every trainable tensor), "gradient" (FedSGD), "subset" (a share of
      the trainable tensors), "slices" (leading slices of them: SLT's narrowed blocks) or
      "scalars" (seeds and projected gradients, which must arrive
      bit-exact). The engine reads it on the instance, once the options are known, so a
      method whose upload depends on its options sets it in ``__init__`` (Spry).
    - ``spec(ctx)``, what a client trains and how, for the cost model (costs/predict.py);
      ``plan`` checks it against a device's budget.
    """

    name: str = "fedavg"
    payload_kind: str = "weights"
    # a seed-and-scalar method whose scalars the robust rules can combine (DeComFL)
    combines_scalars: bool = False

    def __init__(self, options: object, config: Config) -> None:
        self.options = options
        self.config = config

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        """Every parameter is trainable."""
        model.requires_grad_(True)
        return model

    def spec(self, ctx: CostContext) -> TrainSpec:
        """What every client trains and how, for the cost model (costs/predict.py)."""
        return TrainSpec("full", optimizer=ctx.optimizer)

    def plan(self, budget: Budget, ctx: CostContext) -> Plan:
        """Every client trains the same tensors: it fits its budget or is excluded.

        A plan must depend only on ``budget`` and ``ctx`` (no state, no client identity):
        the engine plans once per distinct budget and hands clients with equal budgets the
        same Plan (engine/setup.py), which is how 10,000 clients plan in well under a second.
        """
        return check(self.spec(ctx), budget, ctx)

    def plan_done(self, model: torch.nn.Module, plans: Sequence[Plan]) -> None:
        """Called once with every client's plan (excluded ones included); nothing to do."""

    def init(self, model: torch.nn.Module) -> ServerState:
        return ServerState(round=0, params=trainable_tensors(model))

    def start_round(self, state: ServerState, clients: Sequence[int]) -> None:
        """The round's clients, in order, before any ``configure``; nothing to do here."""

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        return ClientTask(client_id, state.round + 1, seed, download=state.params)

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        load_tensors_(model, task.download)
        metrics = local_train(model, shard, ctx, task.seed)
        payload = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return Update(task.client_id, payload, len(shard), metrics)

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        mean = self.combine(state, [u.payload for u in updates], [u.num_examples for u in updates])
        return apply_server_update(state, mean, self.config.server)

    def combine(
        self,
        state: ServerState,
        payloads: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        gradients: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The round's uploads of tensors combined by ``server.aggregation`` (the weighted
        mean by default; fedfit/robust.py); ``gradients``: they are gradients, not weights
        of ``state.params`` (what ``server.clip_norm`` clips is then the upload itself). With
        ``[privacy]`` on, DP-FedAvg's noisy clipped mean instead (fedfit/privacy.py)."""
        privacy = self.config.privacy
        if privacy.enabled:  # DP-FedAvg (fedfit/privacy.py): clipped, equal-weight, noised
            return dp_mean(
                payloads,
                state.params,
                gradients=gradients,
                clip_norm=privacy.clip_norm,
                noise_multiplier=privacy.noise_multiplier,
                sampled=self.config.data.clients_per_round,
                generator=torch.Generator().manual_seed(
                    noise_seed(self.config.run.seed, state.round + 1)
                ),
            )
        server = self.config.server
        return combine(
            payloads,
            weights,
            rule=server.aggregation,
            trim=server.trim,
            krum_f=server.krum_f,
            clip_norm=server.clip_norm,
            reference=None if gradients else state.params,
        )


# ---------------------------------------------------------------- shared pure functions


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that require grad, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_tensors_(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's parameters of the same names, in place."""
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise KeyError(f"payload names not in the model: {missing[:3]}")
    for name, value in tensors.items():
        params[name].copy_(value)


def apply_server_update(
    state: ServerState, target: Mapping[str, torch.Tensor], server: ServerConfig
) -> ServerState:
    """Move the global tensors towards ``target`` with the server optimiser (pseudo-gradient)."""
    from fedfit.server_opt import server_step

    delta = {n: t - state.params[n].to(t.dtype) for n, t in target.items()}
    params, opt_state = server_step(state.params, delta, state.opt_state, server)
    params = {n: p.to(state.params[n].dtype) for n, p in params.items()}
    return ServerState(state.round + 1, params, opt_state, dict(state.extra))


def make_optimizer(
    params: Sequence[torch.nn.Parameter], train: TrainConfig
) -> torch.optim.Optimizer:
    """The client optimiser named in the config, fresh for each client update.

    Adafactor is transformers' implementation (Shazeer & Stern, ICML 2018) used with the
    configured lr (``relative_step=False``, ``scale_parameter=False``), no first moment
    (``beta1=None``, its default): its state is one row and one column vector per matrix, so
    far less than AdamW's two full moments (measured per step as ``optimizer_bytes``).
    """
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=train.lr,
            weight_decay=train.weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def client_steps(train: TrainConfig, num_examples: int) -> int:
    """Optimiser steps of one client's round: ``local_steps``, or ``local_epochs`` passes
    over its ``num_examples`` in batches of ``batch_size`` (all of them when fewer)."""
    if train.local_steps:
        return train.local_steps
    per_epoch = max(1, num_examples // min(train.batch_size, num_examples))
    return max(1, round(train.local_epochs * per_epoch))


def batch_indices(shard: ClientData, train: TrainConfig, seed: int) -> Iterator[np.ndarray]:
    """The client's minibatches: ``local_steps`` batches, or ``local_epochs`` passes.

    Examples are drawn without replacement from a fresh seeded permutation each epoch; a
    client with fewer examples than the batch size uses all of them per batch. With
    ``train.bucket_by_length`` each epoch's batches are formed from examples of similar
    length instead (``length_buckets``), so that a batch padded to its longest wastes little.
    """
    num_examples = len(shard)
    rng = np.random.default_rng(seed)
    size = min(train.batch_size, num_examples)
    steps = client_steps(train, num_examples)
    lengths = np.array([len(s) for s in shard.seqs]) if train.bucket_by_length else None
    epoch: list[np.ndarray] = []
    for _ in range(steps):
        if not epoch:
            order = rng.permutation(num_examples)
            epoch = (
                [order[i : i + size] for i in range(0, num_examples - size + 1, size)]
                if lengths is None
                else length_buckets(order, lengths, size, rng)
            )
        yield epoch.pop(0)


# Examples sorted by length within windows of this many batches (a seeded share of the shard,
# not the whole of it: batches still mix examples from all over the shard).
BUCKET_WINDOW = 50


def length_buckets(
    order: np.ndarray, lengths: np.ndarray, size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch's batches of similar-length examples: the permutation ``order`` cut into
    windows of ``BUCKET_WINDOW`` batches, each window sorted by length (stable) and cut into
    batches of ``size``, then the batches in a seeded random order. Like the plain epoch,
    the last ``len(order) % size`` examples of the permutation sit this epoch out."""
    usable = order[: len(order) - len(order) % size]
    batches = []
    window = size * BUCKET_WINDOW
    for start in range(0, len(usable), window):
        chunk = usable[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    return [batches[int(i)] for i in rng.permutation(len(batches))]


def local_train(
    model: torch.nn.Module,
    shard: ClientData,
    ctx: ClientContext,
    seed: int,
    eval_modules: Sequence[torch.nn.Module] = (),
) -> dict[str, float]:
    """Local training of the model's trainable parameters on one shard (backprop).

    Dropout draws from torch's global generator, which is seeded from ``seed`` so that the
    same (run seed, round, client) always gives the same update. ``eval_modules`` run in
    eval mode (no dropout) while the rest trains: frozen feature extractors.
    """
    torch.manual_seed(seed)
    model.train()
    for module in eval_modules:
        module.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, ctx.train)
    losses = [
        ctx.meter.train_step(model, optimizer, shard.batch(index))
        for index in batch_indices(shard, ctx.train, seed)
    ]
    return {"train_loss": float(np.mean(losses)), "steps": float(len(losses))}


def train_subset(
    model: torch.nn.Module,
    names: Collection[str],
    trainable: Collection[str],
    train: Callable[[], dict[str, float]],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Run ``train`` with only ``names`` of the ``trainable`` parameters requiring grad, then
    make every one of ``trainable`` require grad again (also if ``train`` fails); returns the
    upload, copies of the ``names`` tensors in name order, and ``train``'s metrics.

    Freezing the rest (not just leaving it out of the optimiser) keeps autograd from saving
    activations and running backward below the lowest trained tensor (layers, partial).
    """
    params = dict(model.named_parameters())
    try:
        for name in trainable:
            params[name].requires_grad_(name in names)
        metrics = train()
    finally:
        for name in trainable:
            params[name].requires_grad_(True)
    return {n: params[n].detach().clone() for n in sorted(names)}, metrics
