"""Constraint-aware layer fine-tuning (Pfeiffer et al., arXiv 2411.07826), docs/methods.md.

Each client trains only the top ``n`` transformer blocks plus the head and freezes everything
below: no parameter below the first trained block requires grad, so autograd saves no
activations there and runs no backward there (peak memory and backward FLOPs cover the
trained blocks only). The client uploads only what it trained.

Server aggregation is layer-wise: a tensor's new value is the example-weighted mean over
the clients that trained it this round; a tensor nobody trained keeps its value
(``aggregation = "weighted"``). The group's earlier code instead mixes
``w <- r * mean(trained copies) + (1 - r) * w_old`` with ``r`` the fraction of the round's
clients that trained that layer (``aggregation = "r_weighted"``). Either target then goes
through the configured server optimiser (plain replacement with fedavg, server lr 1).

Choices the paper leaves open, made here:
- "head" = what sits above the block stack: BERT's pooler and classifier; Llama's final norm
  and score (classification) or final norm only (causal LM: SmolLM2 ties the output
  projection to the input embeddings, and training that matrix would make the embedding
  lookup at the bottom require grad and so keep every block's activations).
- Frozen blocks (and the embeddings) run in eval mode, without dropout, while the top
  blocks train: they are a fixed feature extractor. This also makes their outputs fixed per
  example, which the frozen-prefix cache (prefix_cache.py) relies on.
- Download = every tensor any client may train (all blocks + head): a client's frozen
  prefix must follow the layers other clients trained in earlier rounds.
- Depth per client: the largest n <= ``max_depth`` whose predicted peak memory, FLOPs per
  round and upload fit the device's budget (``plan``), on the worst-case batch shape; a
  device where even n = 1 does not fit is excluded with that reason.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedfit.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    StepMeter,
    Update,
    apply_server_update,
    load_tensors_,
    local_train,
    train_subset,
)
from fedfit.algorithms.prefix_cache import PrefixCache
from fedfit.algorithms.registry import register
from fedfit.costs.measure import StepFn, backprop
from fedfit.costs.spec import TrainSpec
from fedfit.devices import Budget
from fedfit.log import log
from fedfit.models.precision import frozen_in
from fedfit.models.structure import embeddings, head_modules, transformer_layers
from fedfit.planning import CostContext, Plan, first_fit

AGGREGATIONS = ("weighted", "r_weighted")
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class LayersOptions:
    max_depth: int = field(
        default=0, metadata={"help": "most top blocks a client trains; 0 = every block"}
    )
    aggregation: str = field(
        default="weighted", metadata={"help": "weighted | r_weighted (layer-wise mixing)"}
    )
    prefix_cache: bool = field(
        default=True,
        metadata={"help": "simulation: reuse outputs of the blocks no device trains"},
    )
    prefix_cache_mb: float = field(
        default=1024.0,
        metadata={
            "help": "RAM cap of the prefix cache in MiB; least recently visited clients' "
            "entries are dropped and recomputed (results unchanged); 0 = no cap"
        },
    )
    prefix_cache_dtype: str = field(
        default="float32",
        metadata={
            "help": "float32 (exact) | float16 (half the RAM; replayed states rounded, "
            "results change slightly)"
        },
    )

    def __post_init__(self) -> None:
        from fedfit.config import ConfigError

        if self.max_depth < 0:
            raise ConfigError("method.max_depth: must be >= 0 (0 = every block)")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"method.aggregation: {self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}"
            )
        if not self.prefix_cache_mb >= 0:  # also NaN
            raise ConfigError("method.prefix_cache_mb: must be >= 0 (0 = no cap)")
        if self.prefix_cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"method.prefix_cache_dtype: {self.prefix_cache_dtype!r} is not one of "
                f"{', '.join(CACHE_DTYPES)}"
            )


def layer_groups(model: torch.nn.Module, task: str) -> list[list[str]]:
    """Parameter names per trainable unit, top first: [head, block L-1, block L-2, ...]."""
    owner: dict[int, int] = {}
    blocks = transformer_layers(model)
    for i, block in enumerate(blocks):
        for p in block.parameters():
            owner[id(p)] = len(blocks) - i  # top block -> 1
    for module in head_modules(model, task):
        for p in module.parameters():
            owner[id(p)] = 0
    groups: list[list[str]] = [[] for _ in range(len(blocks) + 1)]
    for name, p in model.named_parameters():
        if id(p) in owner:
            groups[owner[id(p)]].append(name)
    return groups


def trained_names(groups: list[list[str]], depth: int) -> list[str]:
    """Head plus the top ``depth`` blocks."""
    if depth > len(groups) - 1:
        raise ValueError(f"layers: depth {depth} > the model's {len(groups) - 1} blocks")
    return [n for group in groups[: depth + 1] for n in group]


class LayerFineTuning(Algorithm):
    name = "layers"
    options: LayersOptions

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        """Everything a client may train is marked trainable; client_update narrows it."""
        self.groups = layer_groups(model, task)
        trained_names(self.groups, self.max_depth())  # fail early on a too-deep option
        allowed = {n for group in self.groups for n in group}
        for name, p in model.named_parameters():
            p.requires_grad_(name in allowed)
        return model

    def max_depth(self) -> int:
        return self.options.max_depth or len(self.groups) - 1

    def plan(self, budget: Budget, ctx: CostContext) -> Plan:
        """The deepest top-n that fits, most blocks first."""
        specs = [
            TrainSpec(
                "layers", trained_layers=n, optimizer=ctx.optimizer, frozen_dtype=self.frozen_dtype
            )
            for n in range(self.max_depth(), 0, -1)
        ]
        return first_fit(specs, budget, ctx)

    def plan_done(self, model: torch.nn.Module, plans: Sequence[Plan]) -> None:
        """With every device's depth known, the blocks nobody trains can be cached."""
        deepest = max((p.depth for p in plans if p.ok and p.spec is not None), default=0)
        frozen = len(self.groups) - 1 - (deepest or self.max_depth())
        self.cache = None
        if self.options.prefix_cache and frozen > 0:
            max_bytes = int(self.options.prefix_cache_mb * 2**20)
            dtype = CACHE_DTYPES[self.options.prefix_cache_dtype]
            self.cache = PrefixCache(model, frozen, max_bytes, dtype)
            cap = f"at most {self.options.prefix_cache_mb:g} MiB" if max_bytes else "no cap"
            log(
                f"layers: blocks 0-{frozen - 1} are trained by no device; their outputs are "
                f"cached per example (frozen-prefix cache, {self.options.prefix_cache_dtype}, "
                f"{cap})"
            )

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        task = ClientTask(client_id, state.round + 1, seed, download=state.params)
        task.config["depth"] = plan.depth if plan is not None and plan.ok else self.max_depth()
        return task

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        load_tensors_(model, task.download)
        names = set(trained_names(self.groups, int(task.config["depth"])))
        allowed = {n for group in self.groups for n in group}
        depth = int(task.config["depth"])
        blocks = list(transformer_layers(model))
        frozen = [embeddings(model), *blocks[: len(blocks) - depth]]
        cache: PrefixCache | None = getattr(self, "cache", None)

        def train() -> dict[str, float]:
            if cache is None:
                with frozen_in(model, self.frozen_dtype):
                    return local_train(model, shard, ctx, task.seed, eval_modules=frozen)
            with cache.replaying():
                view = _CachedShard(shard, cache)
                meter = _PrefixMeter(ctx.meter, cache)
                return local_train(model, view, ClientContext(ctx.train, meter), task.seed, frozen)

        payload, metrics = train_subset(model, names, allowed, train)
        metrics["trained_layers"] = float(task.config["depth"])
        return Update(task.client_id, payload, len(shard), metrics)

    @property
    def frozen_dtype(self) -> str:
        """The precision a device holds the frozen prefix in, planned and trained alike:
        float32 here (CoCoFL, algorithms/cocofl.py, holds it lower)."""
        return "float32"

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        mean = self.combine(state, [u.payload for u in updates], [u.num_examples for u in updates])
        if self.options.aggregation == "r_weighted":
            for name in mean:
                r = sum(name in u.payload for u in updates) / len(updates)
                mean[name] = r * mean[name] + (1 - r) * state.params[name].to(mean[name].dtype)
        return apply_server_update(state, mean, self.config.server)


class _CachedShard(ClientData):
    """A shard whose batches arm the prefix cache's replay with their cached states."""

    def __init__(self, shard: ClientData, cache: PrefixCache) -> None:
        super().__init__(shard.client_id, shard.seqs, shard.labels, shard.pad_id, shard.lm)
        self.shard, self.cache = shard, cache

    def batch(self, index: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        return self.cache.batch(self.shard, index)


class _PrefixMeter:
    """The engine's meter, with the skipped prefix's measured cost added to every step."""

    def __init__(self, meter: StepMeter, cache: PrefixCache) -> None:
        self.meter, self.cache = meter, cache

    def train_step(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: dict[str, torch.Tensor],
        skipped: Any = None,
        step: StepFn = backprop,
        kind: Hashable = "backprop",
    ) -> float:
        if skipped is not None:
            raise ValueError("the prefix cache's meter adds the skipped prefix itself")
        skipped = self.cache.costs[tuple(batch["input_ids"].shape)]
        return self.meter.train_step(model, optimizer, batch, skipped, step, kind)

    def add_flops(self, flops: int) -> None:
        self.meter.add_flops(flops)


register(
    "layers",
    LayersOptions,
    "Constraint-aware layer fine-tuning: top-n blocks + head, layer-wise averaging",
)(LayerFineTuning)
